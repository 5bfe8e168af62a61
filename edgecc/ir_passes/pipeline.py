"""The Relax lowering pipeline edgecc compiles every model with, per target.

TVM's CPU pipeline (`relax.backend.cpu_generic`) legalizes and fuses, then lowers without scheduling a
single kernel. Ours is the same sequence with one stage inserted after fusion: the default schedules from
`edgecc.schedules` for the target (GPU targets: TVM's dlight rules, crash-tolerant). Keeping the stages as named lists
lets tests run a prefix of the pipeline and look at the IR in between.
"""

from __future__ import annotations

import tvm
from tvm import relax

from edgecc.targets.registry import TargetSpec


def legalize_and_fuse_passes() -> list[tvm.transform.Pass]:
    """Relax ops -> TIR PrimFuncs, fused into one kernel per producer + elementwise epilogue chain."""
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule_passes(spec: TargetSpec) -> list[tvm.transform.Pass]:
    """Give every fused PrimFunc a schedule for this target."""
    if spec.device == "cuda":
        from edgecc.schedules.gpu import gpu_default_schedule

        return [gpu_default_schedule]
    from edgecc.schedules import cpu_schedule_passes

    return cpu_schedule_passes(spec)


def lower_passes() -> list[tvm.transform.Pass]:
    """Dataflow -> VM calls, static memory planning, shape lowering (TVM's own finalisation)."""
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def relax_pipeline(spec: TargetSpec, with_schedules: bool = True) -> tvm.transform.Pass:
    """The whole pipeline as one pass, for `tvm.compile(..., relax_pipeline=...)`."""
    target = spec.tvm()
    stages = legalize_and_fuse_passes()
    if with_schedules:
        stages += schedule_passes(spec)
    stages += lower_passes()

    @tvm.transform.module_pass(opt_level=0, name="edgecc_pipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            return tvm.transform.Sequential(stages)(mod)

    return _pipeline
