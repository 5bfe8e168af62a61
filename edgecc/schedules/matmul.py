"""Dense and batched matmul (NN and NT), GEMV, with their fused elementwise epilogues.

Recognised: one reduction block `C[..] += A[..] * B[..]` whose operands are indexed by plain loop
variables (the einsum form `LegalizeOps` gives `matmul`, `linear`, batched and broadcast matmuls),
injective producers (inlined) and injective consumers (bias, activation, residual: fused at the register
tile). The schedule is the shared register-tile template in `contraction.py`; with at most
`gemv_max_rows` output rows it becomes a GEMV (wide vectors, no packing).
"""

from __future__ import annotations

from tvm import s_tir

from edgecc.schedules import base, contraction
from edgecc.schedules.params import CpuParams
from edgecc.schedules.prefetch import PrefetchedSchedule
from edgecc.targets.registry import TargetSpec


def find_contraction_block(sch: s_tir.Schedule):
    """(the single reduction block, producers, consumers) when all other blocks are spatial."""
    blocks = base.top_blocks(sch)
    reds = [b for b in blocks if not base.is_spatial_block(sch, b)]
    if len(reds) != 1 or not base.is_reduction_block(sch, reds[0]):
        return None
    main = reds[0]
    idx = [sch.get(b).name_hint for b in blocks].index(sch.get(main).name_hint)
    return main, blocks[:idx], blocks[idx + 1:]


def _has_if_then_else(sch, block) -> bool:
    found = []

    def _visit(call):
        if "if_then_else" in str(getattr(call.op, "name", "")):
            found.append(call)

    import tvm_ffi

    tvm_ffi.structural_walk(sch.get(block).body, (base.CallNode, _visit), order="pre")
    return bool(found)


class Matmul(base.ScheduleRule):
    name = "matmul"
    want_plain_s = True  # both operands indexed by plain vars (einsum)
    k_block = False  # split long reductions into chunks (contraction.schedule): the conv rule turns it on

    def _prepare(self, sch: s_tir.Schedule):
        found = find_contraction_block(sch)
        if found is None:
            return None
        main, producers, consumers = found
        for blk in reversed(producers):
            if self.want_plain_s or not _has_if_then_else(sch, blk):
                sch.compute_inline(blk)  # raises when it cannot: the rule then does not apply
        base.try_inline_all(sch, consumers)  # the epilogue chain becomes one block per output
        return main

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        def attempt(work: s_tir.Schedule, fuse_epilogue: bool):
            main = self._prepare(work)
            if main is None:
                return None
            c = contraction.analyze(work, main, params.lanes())
            if c is None or c.s_plain != self.want_plain_s:
                return None
            contraction.schedule(work, c, params, fuse_epilogue=fuse_epilogue, k_block=self.k_block)
            if c.chunk_prefetch:
                return PrefetchedSchedule(work, c.chunk_prefetch)
            return work

        return base.with_epilogue_fallback(sch.mod, attempt)
