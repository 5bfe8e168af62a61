"""The Relax lowering pipeline edgecc compiles every model with, per target.

TVM's CPU pipeline (`relax.backend.cpu_generic`) legalizes and fuses, then lowers without scheduling a
single kernel. Ours is the same sequence with one stage inserted after fusion: the default schedules from
`edgecc.schedules` for the target (GPU targets: TVM's dlight rules, crash-tolerant), preceded by the
schedules `edgecc tune` measured for this target, where its database has them. Keeping the stages as named lists
lets tests run a prefix of the pipeline and look at the IR in between.
"""

from __future__ import annotations

import tvm
from tvm import relax

from edgecc.targets.registry import TargetSpec


@tvm.transform.module_pass(opt_level=0, name="edgecc.FastMath")
def _fast_math(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
    """TVM's FastMathTransform, skipped for modules it cannot handle (it throws on calls to extern
    functions, e.g. in imported attention graphs): exact math is slower but still correct."""
    try:
        return relax.transform.FastMathTransform()(mod)
    except Exception:  # noqa: BLE001 - a TVM pass error; fall back to the exact functions
        return mod


def legalize_and_fuse_passes() -> list[tvm.transform.Pass]:
    """Relax ops -> TIR PrimFuncs, fused into one kernel per producer + elementwise epilogue chain.

    `FastMathTransform` swaps exp/erf/tanh for TVM's polynomial versions before legalization: LLVM turns the
    libm calls into one scalar call per vector lane, which made GELU epilogues and softmax the slowest part
    of a transformer layer. The polynomials stay within fp32 verification tolerance (MiniLM: max abs error
    5.7e-6 against onnxruntime, 2.3e-6 without).
    """
    from edgecc.ir_passes.fold_batchnorm import fold_batchnorm_pass  # BatchNorm/Sum -> conv epilogues

    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        _fast_math,
        fold_batchnorm_pass(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # pure reshapes -> views now: once a schedule has split their loops TVM no longer recognises them
        relax.transform.RewriteDataflowReshape(),
        # ... and drop the reshape kernels no call reads any more (else they are scheduled, compiled and,
        # in `edgecc tune`, tuned for nothing)
        relax.transform.DeadCodeElimination(),
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


def tuning_passes(spec: TargetSpec, tuning_db=None) -> list[tvm.transform.Pass]:
    """The pass applying tuned schedules from a MetaSchedule database, if there is one for this target.

    `tuning_db`: a database directory (`edgecc tune --db`); None = the target's default database
    (`edgecc.schedules.tuning.default_database_dir`), used only when it holds records.
    """
    from edgecc.schedules.tuning import apply_database_pass, resolve_database_dir

    database_dir = resolve_database_dir(spec, tuning_db)
    apply = apply_database_pass(spec, database_dir) if database_dir is not None else None
    return [apply] if apply is not None else []


def relax_pipeline(spec: TargetSpec, with_schedules: bool = True, tuning_db=None) -> tvm.transform.Pass:
    """The whole pipeline as one pass, for `tvm.compile(..., relax_pipeline=...)`.

    With schedules, attention subgraphs first become one fused kernel on CPU targets
    (`edgecc.ir_passes.fuse_attention`); tuned records (see `tuning_passes`) are applied right after FuseTIR,
    and the default schedules then take every function the database did not cover.
    """
    target = spec.tvm()
    from edgecc.targets.byoc import byoc_passes  # vendor targets: partition to the vendor codegen first

    from edgecc.ir_passes import fuse_attention  # attention -> one kernel (CPU schedules)

    fused = [fuse_attention.fuse_attention_pass(spec)] if with_schedules and fuse_attention.applies_to(spec) else []
    stages = byoc_passes(spec) + fused + legalize_and_fuse_passes()
    if with_schedules:
        stages += tuning_passes(spec, tuning_db)
        stages += schedule_passes(spec)
    if spec.device == "cpu":  # after scheduling: tuning records are keyed by the kernels as scheduled
        from edgecc.ir_passes.unaligned_inputs import unaligned_inputs_pass  # zero-copy numpy inputs

        stages.append(unaligned_inputs_pass)
    stages += lower_passes()

    @tvm.transform.module_pass(opt_level=0, name="edgecc_pipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            return tvm.transform.Sequential(stages)(mod)

    return _pipeline
