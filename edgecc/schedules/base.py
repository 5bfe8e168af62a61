"""The rule interface, the pass that applies rules to every PrimFunc, and shared TIR helpers.

A rule (`ScheduleRule.apply`) gets a fresh `s_tir.Schedule` of one PrimFunc and either returns it
scheduled or returns None when the function is not its pattern. The pass tries the rules in order; a rule
that raises is treated like one that does not match (the function is left as it was, never half
scheduled), so a schedule bug costs speed, not the build.

Scheduled functions get the attributes `edgecc.schedule` (the rule's name) and `tirx.is_scheduled`;
functions no rule scheduled get `edgecc.schedule = "none"` (and `edgecc.schedule_error` when a rule
failed on them). `unscheduled_primfuncs(mod)` lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec

log = logging.getLogger(__name__)

SCHEDULE_ATTR = "edgecc.schedule"
ERROR_ATTR = "edgecc.schedule_error"
NO_SCHEDULE = "none"

_get_sblock_realize = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")

# TVM 0.27 node classes (`tirx.BufferLoad` is a constructor function, the class lives in tvm.ir)
LoadNode = tvm.ir.expr.TensorLoad
CallNode = tvm.ir.expr.Call if hasattr(tvm.ir.expr, "Call") else tvm.ir.Call


class ScheduleRule:
    """One op family's default schedule."""

    name = "rule"

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams) -> s_tir.Schedule | None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------


def is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    if SCHEDULE_ATTR in attrs and str(attrs[SCHEDULE_ATTR]) != NO_SCHEDULE:
        return True
    return "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def schedule_func(
    func: tirx.PrimFunc, rules: Sequence[ScheduleRule], spec: TargetSpec, params: CpuParams
) -> tuple[tirx.PrimFunc, str | None, str | None]:
    """Try the rules on one PrimFunc: (new function, rule name or None, last error or None)."""
    error = None
    for rule in rules:
        try:
            sch = s_tir.Schedule(tvm.IRModule({"main": func}))
            out = rule.apply(sch, spec, params)
            if out is None:
                continue
            new_func = out.mod["main"]
            return new_func, rule.name, None
        except Exception as exc:  # noqa: BLE001 - a failing rule falls back to the next one
            error = f"{rule.name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            log.debug("schedule rule %s failed: %s", rule.name, exc)
    return func, None, error


def apply_rules_pass(rules: Sequence[ScheduleRule], spec: TargetSpec, params: CpuParams) -> tvm.transform.Pass:
    """A module pass that schedules every not-yet-scheduled PrimFunc with the first matching rule."""

    @tvm.transform.module_pass(opt_level=0, name="EdgeccDefaultSchedule")
    def _pass(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            new_func, rule_name, error = schedule_func(func, rules, spec, params)
            if rule_name is not None:
                new_func = new_func.with_attr(SCHEDULE_ATTR, rule_name).with_attr("tirx.is_scheduled", True)
            else:
                new_func = func.with_attr(SCHEDULE_ATTR, NO_SCHEDULE)
                if error:
                    new_func = new_func.with_attr(ERROR_ATTR, error)
            updates[gv] = new_func
        if not updates:
            return mod
        mod = mod.clone()  # never mutate the caller's module
        for gv, func in updates.items():
            mod.update_func(gv, func)
        return mod

    return _pass


def unscheduled_primfuncs(mod: tvm.ir.IRModule) -> list[str]:
    """Names of the PrimFuncs in `mod` that no rule scheduled (for reports)."""
    names = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
            names.append(gv.name_hint)
    return sorted(names)


def schedule_report(mod: tvm.ir.IRModule) -> dict[str, str]:
    """PrimFunc name -> rule that scheduled it ("none" when none did; with the error when a rule failed)."""
    out = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        rule = str(attrs[SCHEDULE_ATTR]) if SCHEDULE_ATTR in attrs else (
            "external" if is_scheduled(func) else NO_SCHEDULE)
        if ERROR_ATTR in attrs:
            rule += f" ({attrs[ERROR_ATTR]})"
        out[gv.name_hint] = rule
    return out


# ---------------------------------------------------------------------------------------------------
# TIR helpers shared by the rules
# ---------------------------------------------------------------------------------------------------


def lane_sum(vec, lanes: int):
    """The sum of the `lanes` lanes of the vector expression `vec`, as a tree of halves (`tirx.Shuffle`, log2
    deep) for hand-written kernels. A TIR loop over the lanes compiles to `lanes` dependent scalar adds: LLVM
    keeps a float sum's order (in the decode attention kernel that chain was the critical path)."""
    while lanes > 1:
        lanes //= 2
        vec = tirx.Shuffle([vec], [tirx.IntImm("int32", i) for i in range(lanes)]) + \
            tirx.Shuffle([vec], [tirx.IntImm("int32", i) for i in range(lanes, 2 * lanes)])
    return vec


def vars_in(expr) -> set:
    """The tirx.Vars used in an expression."""
    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def loads_in(expr) -> list:
    """The buffer loads in an expression (pre-order)."""
    found = []
    tvm_ffi.structural_walk(expr, (LoadNode, found.append), order="pre")
    return found


def has_if_then_else(sch: s_tir.Schedule, block) -> bool:
    """Whether the block's body selects with `if_then_else` (padding, masks)."""
    found = []

    def _visit(call):
        if "if_then_else" in str(getattr(call.op, "name", "")):
            found.append(call)

    tvm_ffi.structural_walk(sch.get(block).body, (CallNode, _visit), order="pre")
    return bool(found)


def root_block(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV:
    return sch.get_sblock("root")


def top_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    return list(sch.get_child_blocks(root_block(sch)))


def intermediate_buffers(sch: s_tir.Schedule) -> set:
    """Buffers allocated inside the function (not parameters)."""
    return set(sch.get(root_block(sch)).alloc_buffers)


def is_spatial_block(sch: s_tir.Schedule, block) -> bool:
    return all(int(iv.iter_type) == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def is_reduction_block(sch: s_tir.Schedule, block) -> bool:
    kinds = {int(iv.iter_type) for iv in sch.get(block).iter_vars}
    return tirx.IterVar.CommReduce in kinds and kinds <= {tirx.IterVar.DataPar, tirx.IterVar.CommReduce}


def const_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def loop_of_iter(sch: s_tir.Schedule, block, *, strict: bool = True) -> dict | None:
    """Block iter var -> the loop it is bound to, when every binding is one distinct loop var.

    With `strict=False` iters bound to expressions are left out instead of failing."""
    loops = sch.get_loops(block)
    by_var = {sch.get(lp).loop_var: lp for lp in loops}
    values = _get_sblock_realize(sch, block).iter_values
    iters = sch.get(block).iter_vars
    out = {}
    used = set()
    for iv, val in zip(iters, values):
        if not isinstance(val, tirx.Var) or val not in by_var or val in used:
            if isinstance(val, tirx.IntImm) and int(iv.dom.extent) == 1:
                out[iv.var] = None
                continue
            if not strict:
                continue
            return None
        used.add(val)
        out[iv.var] = by_var[val]
    return out


def with_epilogue_fallback(snapshot, attempt):
    """Run `attempt(schedule, fuse_epilogue)` on a fresh schedule of `snapshot`, fusing the epilogue first
    and, if a primitive refuses, once more without: the schedule `attempt` returns (None: the rule does not
    apply), or the last error when both tries fail."""
    last_error = None
    for fuse_epilogue in (True, False):
        try:
            return attempt(s_tir.Schedule(snapshot), fuse_epilogue)
        except Exception as exc:  # noqa: BLE001 - try without epilogue fusion, then give up
            last_error = exc
    raise last_error


def try_inline_all(sch: s_tir.Schedule, blocks: Iterable, *, reverse: bool = False) -> list:
    """compute_inline every block that allows it (then reverse_compute_inline when `reverse`);
    returns the blocks that stayed."""
    kept = []
    for blk in blocks:
        try:
            sch.compute_inline(blk)
            continue
        except Exception:  # noqa: BLE001 - not inlinable (writes an output, not injective, ...)
            pass
        if reverse:
            try:
                sch.reverse_compute_inline(blk)
                continue
            except Exception:  # noqa: BLE001
                pass
        kept.append(blk)
    return kept


def vectorize_innermost(
    sch: s_tir.Schedule, block, lanes: int, params: CpuParams, *, allow_tail: bool = True
) -> bool:
    """Vectorize the innermost loop of `block` by `lanes`, keeping a scalar tail loop.

    A loop whose extent is not a multiple of the vector is partitioned first (main part: multiple of
    `lanes`, vectorized without predicate; tail: scalar) because TVM scalarizes a whole vectorized loop
    whose body carries a predicate.
    """
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner = loops[-1]
    ext = const_extent(sch, inner)
    if ext is None or ext < 2:
        return False
    if ext <= lanes:
        if ext in (lanes, lanes // 2, lanes // 4) and ext >= 2:
            sch.vectorize(inner)
            return True
        return False
    main = (ext // lanes) * lanes
    if main != ext:
        if not allow_tail:
            return False
        parts = sch.loop_partition(inner, [main, None])
        inner = parts[0]
    _, vec = sch.split(inner, [None, lanes])
    sch.vectorize(vec)
    return True


def parallelize_outer(sch: s_tir.Schedule, loops: list, params: CpuParams, *, keep_inner: int = 1):
    """Fuse leading loops (leaving `keep_inner` inner ones) until there is enough parallel work; parallel it."""
    loops = list(loops)
    if len(loops) <= keep_inner:
        return None
    candidates = loops[: len(loops) - keep_inner]
    chosen = []
    work = 1
    for lp in candidates:
        ext = const_extent(sch, lp)
        if ext is None:
            break
        chosen.append(lp)
        work *= ext
        if work >= params.min_parallel_tasks * 4:
            break
    if not chosen or work < 2:
        return None
    fused = sch.fuse(*chosen) if len(chosen) > 1 else chosen[0]
    sch.parallel(fused)
    return fused
