"""Injective kernels (elementwise, broadcast, transpose, concat, pad...): parallel outer, vectorized inner.

Producers that only feed others are inlined into their consumers (what FuseOps fused stays one loop
nest); each remaining block gets its leading loops fused into one parallel loop and its innermost loop
vectorized by the target's lanes (a tail that is not a multiple of the vector becomes a scalar loop).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from edgecc.schedules import base
from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec

# Below this many output elements a parallel loop costs more than it saves.
_MIN_PARALLEL_ELEMENTS = 4096


def _inner_is_contiguous(sch: s_tir.Schedule, block) -> bool:
    """Whether the innermost loop walks the last dimension of the written buffer."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(stmt.writes) != 1:
        return False
    inner_var = sch.get(loops[-1]).loop_var
    values = base._get_sblock_realize(sch, block).iter_values
    iter_of_inner = None
    for iv, val in zip(stmt.iter_vars, values):
        if isinstance(val, tirx.Var) and val.same_as(inner_var):
            iter_of_inner = iv.var
    if iter_of_inner is None:
        return False
    last = stmt.writes[0].region[-1].min
    return isinstance(last, tirx.Var) and last.same_as(iter_of_inner)


def schedule_spatial_block(sch: s_tir.Schedule, block, params: CpuParams) -> None:
    """Parallel outer loops + vectorized innermost loop for one spatial block at the root."""
    stmt = sch.get(block)
    bits = 32
    if stmt.writes:
        bits = max(8, _bits(stmt.writes[0].source.dtype))
    lanes = params.lanes(bits)
    loops = sch.get_loops(block)
    if not loops:
        return
    total = 1
    for lp in loops:
        ext = base.const_extent(sch, lp)
        total *= ext if ext is not None else 1 << 20
    contiguous = _inner_is_contiguous(sch, block)
    if total >= _MIN_PARALLEL_ELEMENTS:
        base.parallelize_outer(sch, loops, params, keep_inner=1)
    if contiguous:
        base.vectorize_innermost(sch, block, lanes, params)


def _bits(dtype) -> int:
    import tvm

    return tvm.runtime.DataType(str(dtype)).bits


class Elementwise(base.ScheduleRule):
    """Every block is spatial."""

    name = "elementwise"

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        blocks = base.top_blocks(sch)
        if not blocks or not all(base.is_spatial_block(sch, b) for b in blocks):
            return None
        rest = base.try_inline_all(sch, blocks[:-1]) + [blocks[-1]]
        for blk in rest:
            schedule_spatial_block(sch, blk, params)
        return sch
