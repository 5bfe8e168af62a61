"""2-D pooling without padding (max / average, NCHW): one output row per task, the window taps outside.

`LegalizeOps` gives `pool[n, c, y, x] = max/sum over (ry, rx) of x[n, c, y*s + ry, x*s + rx]` (padding inlined
as `if_then_else`, or a pad block before it), and for an average a division block after it. As a generic row
reduction every output element was its own task, its fused index split by division and modulo, with a 9-step
scalar window: SqueezeNet's 3x3 / 2 max pool over 64x111x111 took 0.80 ms; this way 0.25 ms (2 threads, the
kernel alone), and the whole model ran 0.97x (in-process A/B). Here the rows (n, c, y) are the parallel loop
and each row is accumulated whole, tap by tap:

    for n, c, y (parallel):
        acc[0 : W] = init                         # vectorized
        for ry, rx:
            for x:  acc[x] = max/+ (acc[x], in[.., y*s + ry, x*s + rx])   # LLVM vectorizes it
        out[.., y, 0 : W] = acc (/ count)         # the average's division, at the row, vectorized

Padded pools (explicit padding, or ceil mode's partial window) are not taken: the border test on every tap
keeps the row loop scalar, and Inception-v2, whose pools are all padded, measured 1.03x slower this way.

`EDGECC_POOLING=0` leaves pools to the row-reduction rule (for A/B timing).
"""

from __future__ import annotations

import os

from tvm import s_tir, tirx

from edgecc.schedules import base
from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec

_POOL_BLOCKS = ("pool_max", "pool_sum")  # LegalizeOps' (topi's) names for the window reduction


class Pooling(base.ScheduleRule):
    name = "pooling"

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        if os.environ.get("EDGECC_POOLING", "1") == "0":  # A/B timing: pools as row reductions
            return None
        blocks = base.top_blocks(sch)
        reds = [b for b in blocks if not base.is_spatial_block(sch, b)]
        if len(reds) != 1 or sch.get(reds[0]).name_hint not in _POOL_BLOCKS:
            return None
        red = reds[0]
        idx = blocks.index(red)
        producers, consumers = blocks[:idx], blocks[idx + 1:]
        if any(base.has_if_then_else(sch, b) for b in producers + [red]):
            # padded: a row reduction (module docstring)
            return None
        iters = sch.get(red).iter_vars
        kinds = [int(iv.iter_type) for iv in iters]
        if len(iters) != 6 or kinds != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 2:
            return None
        for blk in reversed(producers):
            sch.compute_inline(blk)
        lp = base.loop_of_iter(sch, red)
        if lp is None or any(lp[iv.var] is None for iv in iters[2:]):
            return None
        n, c, y, x, ry, rx = (lp[iv.var] for iv in iters)
        row = sch.fuse(*[lp_ for lp_ in (n, c, y) if lp_ is not None])
        sch.parallel(row)
        sch.reorder(ry, rx, x)
        lanes = params.lanes(32)
        for blk in consumers:
            sch.reverse_compute_at(blk, row, preserve_unit_loops=True)
        init = sch.decompose_reduction(red, ry)
        for blk in [init] + consumers:
            base.vectorize_innermost(sch, blk, lanes, params)
        # the window update's row loop is left to LLVM's loop vectorizer: TIR refuses `vectorize` on it (the
        # update, its init split off, is no longer a reduction block the primitive accepts)
        return sch
