"""Default schedules per op family and ISA (see issue: schedules and autotuning).

`cpu_schedule_passes(spec)` returns the passes that schedule every fused PrimFunc for a CPU target, without
tuning. Rules, tried in order, one module per op family (like TVM's dlight):

- `matmul.Matmul`: dense / batched / broadcast matmul, NN and NT, GEMV, fused epilogues
- `conv2d.Conv2d`: convolutions as implicit GEMM on the same register-tile template (`contraction.py`); the
  K-blocked ones over build-time weight panels prefetch their next weight chunk (`prefetch.py`)
- `depthwise.GroupedConvRule`: depthwise and grouped convolutions (NCHW/NHWC) as a direct, vectorized conv
- `pooling.Pooling`: 2-D max / average pooling, a row per task, vectorized along the row
- `reduction.Reduction`: softmax, layer/RMS norm, mean/sum/max reductions, other pooling
- `elementwise.Elementwise`: injective kernels
- `reduction.Fallback`: anything else gets at least its outer loops parallel

Attention is not left to these rules: before legalization, `edgecc.ir_passes.fuse_attention` replaces
``softmax(q K^T * c [+ mask]) V`` with one pre-scheduled kernel (`attention.prefill_attention_kernel`,
flash-style over key blocks; decode steps over a KV cache get `attention.decode_attention_kernel` from
`edgecc.ir_passes.kv_cache`).

Tile sizes come from `params.cpu_params(spec)`. A rule that does not match leaves the function alone, a
rule that fails falls back to the next one, and a function no rule scheduled keeps its naive loops;
`unscheduled_primfuncs(mod)` lists those (`schedule_report(mod)` says which rule took each function).
"""

from __future__ import annotations

import tvm

from edgecc.schedules.base import (
    ERROR_ATTR,
    NO_SCHEDULE,
    SCHEDULE_ATTR,
    ScheduleRule,
    apply_rules_pass,
    is_scheduled,
    schedule_report,
    unscheduled_primfuncs,
)
from edgecc.schedules.params import CpuParams, cpu_params
from edgecc.targets.registry import TargetSpec

__all__ = [
    "ERROR_ATTR",
    "NO_SCHEDULE",
    "SCHEDULE_ATTR",
    "CpuParams",
    "ScheduleRule",
    "cpu_params",
    "cpu_rules",
    "cpu_schedule_passes",
    "is_scheduled",
    "schedule_report",
    "unscheduled_primfuncs",
]


def cpu_rules() -> list[ScheduleRule]:
    """The default CPU rules, most specific first."""
    from edgecc.schedules.conv2d import Conv2d
    from edgecc.schedules.depthwise import GroupedConvRule
    from edgecc.schedules.elementwise import Elementwise
    from edgecc.schedules.matmul import Matmul
    from edgecc.schedules.pooling import Pooling
    from edgecc.schedules.reduction import Fallback, Reduction

    return [Matmul(), Conv2d(), GroupedConvRule(), Pooling(), Reduction(), Elementwise(), Fallback()]


def cpu_schedule_passes(spec: TargetSpec) -> list[tvm.transform.Pass]:
    """The passes that give every fused PrimFunc a default schedule for the CPU target `spec`."""
    return [apply_rules_pass(cpu_rules(), spec, cpu_params(spec))]
