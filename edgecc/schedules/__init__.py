"""Default schedules per op family and ISA (see issue: schedules and autotuning).

`cpu_schedule_passes(spec)` returns the passes that schedule every fused PrimFunc for a CPU target.
"""

from __future__ import annotations

import tvm

from edgecc.targets.registry import TargetSpec


def cpu_schedule_passes(spec: TargetSpec) -> list[tvm.transform.Pass]:
    """Placeholder until the schedule rules land: no scheduling (TVM's default CPU behaviour)."""
    return []
