"""Row reductions (softmax, layer/RMS norm, mean/sum/max over trailing axes, pooling) and the fallback.

`Reduction`: the blocks share leading spatial axes (the rows). The rows of the last block become one
parallel loop and every other block is computed per row under it (`compute_at`), so a row stays in
cache from max to exp to sum to normalise. Reductions over a contiguous axis that is a multiple of the
vector are split with `rfactor` into `lanes` partial accumulators (a vectorized accumulation, then one
horizontal reduction); elementwise blocks are vectorized.

`Fallback`: any other function: each block's leading spatial loops fused and parallel, spatial blocks
vectorized. It makes no claim to speed; it keeps odd kernels from running on one core.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from edgecc.schedules import base
from edgecc.schedules.elementwise import _inner_is_contiguous, schedule_spatial_block
from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec


def _leading_spatial(sch: s_tir.Schedule, block) -> list[int]:
    """Extents of the leading data-parallel iters of a block."""
    out = []
    for iv in sch.get(block).iter_vars:
        if int(iv.iter_type) != tirx.IterVar.DataPar or not isinstance(iv.dom.extent, tirx.IntImm):
            break
        out.append(int(iv.dom.extent))
    return out


def _rfactor_inner(sch: s_tir.Schedule, block, lanes: int):
    """Split the innermost reduction loop by `lanes` and rfactor it; returns the rf block or None."""
    loops = sch.get_loops(block)
    lp = base.loop_of_iter(sch, block)
    if lp is None or not loops:
        return None
    stmt = sch.get(block)
    inner_iter = stmt.iter_vars[-1]
    if int(inner_iter.iter_type) != tirx.IterVar.CommReduce:
        return None
    inner_loop = lp[inner_iter.var]
    if inner_loop is None or not sch.get(inner_loop).loop_var.same_as(sch.get(loops[-1]).loop_var):
        return None
    # the innermost reduction axis must walk the last dim of a read buffer (contiguous loads)
    if not any(isinstance(r.region[-1].min, tirx.Var) and r.region[-1].min.same_as(inner_iter.var)
               for r in stmt.reads):
        return None
    ext = base.const_extent(sch, inner_loop)
    if ext is None or ext % lanes != 0 or ext < 2 * lanes:
        return None
    _, ki = sch.split(inner_loop, [None, lanes])
    return sch.rfactor(ki, factor_axis=len(stmt.writes[0].region))


def _vectorize_rf(sch: s_tir.Schedule, rf_block, lanes: int) -> None:
    """Make the rf block's lane loop innermost, vectorize it, and split off the init."""
    stmt = sch.get(rf_block)
    lane_iter = None
    for iv in stmt.iter_vars:
        if (int(iv.iter_type) == tirx.IterVar.DataPar and isinstance(iv.dom.extent, tirx.IntImm)
                and int(iv.dom.extent) == lanes):
            last = stmt.writes[0].region[-1].min
            if isinstance(last, tirx.Var) and last.same_as(iv.var):
                lane_iter = iv.var
    lp = base.loop_of_iter(sch, rf_block, strict=False)
    if lane_iter is None or lp is None or lp.get(lane_iter) is None:
        return
    lane_loop = lp[lane_iter]
    loops = sch.get_loops(rf_block)
    red_loops = [lp[iv.var] for iv in stmt.iter_vars
                 if int(iv.iter_type) == tirx.IterVar.CommReduce and lp.get(iv.var) is not None]
    if not red_loops:
        return
    # the lane loop goes below the reduction loops
    positions = [i for i, l in enumerate(loops) if any(sch.get(l).same_as(sch.get(r)) for r in red_loops)]
    first_red = min(positions)
    tail = [l for l in loops[first_red:] if not sch.get(l).same_as(sch.get(lane_loop))]
    sch.reorder(*tail, lane_loop)
    sch.vectorize(lane_loop)
    init = sch.decompose_reduction(rf_block, red_loops[0] if len(red_loops) == 1 else tail[0])
    sch.vectorize(sch.get_loops(init)[-1])


class Reduction(base.ScheduleRule):
    name = "reduction"

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        snapshot = sch.mod
        last_error = None
        for use_rfactor in (True, False):
            work = s_tir.Schedule(snapshot)
            try:
                out = self._apply(work, params, use_rfactor)
                if out is None:
                    return None
                return out
            except Exception as exc:  # noqa: BLE001
                last_error = exc
        raise last_error

    def _apply(self, sch: s_tir.Schedule, params: CpuParams, use_rfactor: bool):
        blocks = base.top_blocks(sch)
        if not any(base.is_reduction_block(sch, b) for b in blocks):
            return None
        if not all(base.is_spatial_block(sch, b) or base.is_reduction_block(sch, b) for b in blocks):
            return None
        lead = [_leading_spatial(sch, b) for b in blocks]
        n_lead = min(len(x) for x in lead)
        # the blocks must agree on the leading (row) axes
        while n_lead > 0 and len({tuple(x[:n_lead]) for x in lead}) != 1:
            n_lead -= 1
        if n_lead == 0:
            return None
        lanes = params.lanes()

        # 1. inline spatial blocks that feed exactly one consumer (their result is used once)
        for blk in blocks[:-1]:
            if base.is_spatial_block(sch, blk) and len(sch.get_consumers(blk)) == 1:
                try:
                    sch.compute_inline(blk)
                except Exception:  # noqa: BLE001
                    pass
        blocks = base.top_blocks(sch)

        # 2. vectorized partial accumulators for contiguous reductions
        rf_blocks = []
        if use_rfactor:
            for blk in list(blocks):
                if base.is_reduction_block(sch, blk):
                    rf = _rfactor_inner(sch, blk, lanes)
                    if rf is not None:
                        rf_blocks.append(rf)
        blocks = base.top_blocks(sch)
        last = blocks[-1]

        # 3. rows of the last block in parallel, everything else computed per row
        loops = sch.get_loops(last)
        rows = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
        total = base.const_extent(sch, rows) or 0
        if total > 1:
            sch.parallel(rows)
        for blk in reversed(blocks[:-1]):
            sch.compute_at(blk, rows, preserve_unit_loops=True)

        # 4. per block: vectorize elementwise ones, vectorized accumulation in rf blocks
        rf_names = {sch.get(b).name_hint for b in rf_blocks}
        for blk in sch.get_child_blocks(rows):
            name = sch.get(blk).name_hint
            if name in rf_names:
                _vectorize_rf(sch, blk, lanes)
            elif base.is_spatial_block(sch, blk):
                if _inner_is_contiguous(sch, blk) and len(sch.get_loops(blk)) > 1:
                    base.vectorize_innermost(sch, blk, lanes, params)
        return sch


class Fallback(base.ScheduleRule):
    """Leading spatial loops of every root block parallel; spatial blocks vectorized."""

    name = "fallback"

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        blocks = base.top_blocks(sch)
        if not blocks:
            return None
        changed = False
        for blk in blocks:
            if base.is_spatial_block(sch, blk):
                schedule_spatial_block(sch, blk, params)
                changed = True
                continue
            stmt = sch.get(blk)
            lp = base.loop_of_iter(sch, blk)
            if lp is None:
                continue
            loops = sch.get_loops(blk)
            lead = []
            for loop in loops:
                var = sch.get(loop).loop_var
                iv = [iv for iv in stmt.iter_vars if lp.get(iv.var) is not None
                      and sch.get(lp[iv.var]).loop_var.same_as(var)]
                if len(iv) != 1 or int(iv[0].iter_type) != tirx.IterVar.DataPar:
                    break
                lead.append(loop)
            if lead:
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                if (base.const_extent(sch, fused) or 0) > 1:
                    sch.parallel(fused)
                    changed = True
        return sch if changed else None
