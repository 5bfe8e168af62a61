"""GPU schedules: TVM's dlight GPU rules, applied so that one rule's crash cannot fail the build.

`dlight.ApplyDefaultSchedule` stops at the first rule that matches a kernel, and if that rule throws (seen
in TVM 0.27: `Reduction` on a whole-tensor `mean` fails inside rfactor), the whole build fails. Here each
kernel tries the rules in order and moves on to the next when one throws; `Fallback` (thread binding only)
is the last resort every kernel can take.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx


def _gpu_rules():
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def _schedule_one(func: tirx.PrimFunc, target, rules) -> tirx.PrimFunc | None:
    for rule in rules:
        try:
            space = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - a rule bug: try the next rule
            continue
        if space is None:
            continue
        sch = space if isinstance(space, s_tir.Schedule) else space[0]
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


@tvm.transform.module_pass(opt_level=0, name="edgecc.GPUDefaultSchedule")
def gpu_default_schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    target = tvm.target.Target.current(allow_none=False)
    rules = _gpu_rules()
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.is_scheduled", 0) == 1):
            scheduled = _schedule_one(func, target, rules)
            if scheduled is not None:
                updates[gv] = scheduled
    for gv, func in updates.items():
        mod[gv] = func
    return mod
