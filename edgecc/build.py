"""`edgecc build`: ONNX file -> artifact directory, stage by stage.

    load + check ─▶ signature + dims ─▶ import (weights detached) ─▶ lift weight transforms
    ─▶ lower (legalize, fuse, schedule, plan memory) ─▶ codegen + link ─▶ params ─▶ manifest ─▶ rename

Weight-only computations the importer emits (transposes, reshapes of constants) are lifted into a separate
function, run once here at build time, and their results stored in `params.bin`: the deployed model never
repeats them, and the schedules see weights already in the layout their kernels want.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgecc import __version__
from edgecc.frontend.loader import load_model
from edgecc.frontend.signature import bind_dims, index_bounds, read_signature
from edgecc.runtime_bridge import artifact as art
from edgecc.runtime_bridge.params_file import write_params
from edgecc.targets.registry import TargetSpec, get_target
from edgecc.targets.toolchain import require_build_tools

Progress = Callable[[str], None]


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    stage_seconds: dict[str, float]


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"edgecc": __version__}
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnx"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = "unknown"
    return out


def _split_transform_params(mod):
    """Return (deploy module, weight-transform module or None) after LiftTransformParams.

    Inference BatchNorm is folded into a per-channel scale and shift first: as one `batch_norm` call that
    also takes the activations nothing of it can be lifted, while its `gamma / sqrt(var + eps)` and
    `beta - mean * scale` depend on weights only and so are computed here, once, instead of as ~3 tiny
    kernels per BatchNorm in every run (ResNet-50: 66 kernel calls per inference)."""
    import tvm
    from tvm import relax

    from edgecc.ir_passes.fold_batchnorm import fold_batchnorm_pass

    lifted = relax.transform.LiftTransformParams()(fold_batchnorm_pass()(mod))
    transform = {gv: f for gv, f in lifted.functions_items() if gv.name_hint == "main_transform_params"}
    deploy = {gv: f for gv, f in lifted.functions_items() if gv.name_hint != "main_transform_params"}
    return tvm.IRModule(deploy), (tvm.IRModule(transform) if transform else None)


def _run_weight_transforms(transform_mod, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Compile the lifted weight transforms for this machine and run them once."""
    import tvm
    from tvm import relax

    ex = tvm.compile(transform_mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outs = vm["main_transform_params"](tvm.runtime.convert([tvm.runtime.tensor(w) for w in weights]))
    return [o.numpy() for o in outs]


def lift_weight_transforms(imported):
    """-> (deploy module, weight-transform module or None, [(param name, weight after transforms)])."""
    deploy_mod, transform_mod = _split_transform_params(imported.mod)
    weights = [w for _, w in imported.params]
    if transform_mod is not None:
        weights = _run_weight_transforms(transform_mod, weights)
    main = deploy_mod["main"]
    num_input = int(main.attrs["num_input"])
    weight_names = [p.name for p in main.params[num_input:]]
    if len(weight_names) != len(weights):
        raise RuntimeError(f"weight transform produced {len(weights)} tensors for {len(weight_names)} params")
    return deploy_mod, transform_mod, list(zip(weight_names, weights))


def rewrite_weights(deploy_mod, named_weights, spec: TargetSpec):
    """The build-time weight rewrites after compression: q/k/v and gate/up merged into one matmul each, 1x1
    convs as GEMMs and the other conv weights cut into panels (CPU), then GEMV weights stored as column
    panels. `edgecc tune` and the kernel profiler call this too, so the kernels they time are the ones a
    build has. (LLM builds merge only: see `build_llm._import_graph`.)"""
    from edgecc.ir_passes.merge_linears import merge_for_build
    from edgecc.ir_passes.pack_gemv_weights import pack_for_build

    deploy_mod, named_weights = merge_for_build(deploy_mod, named_weights)
    if spec.device == "cpu" and not spec.plugin:  # 1x1 convs as GEMMs (EDGECC_CONV1X1_GEMM=0: off)
        from edgecc.ir_passes.conv1x1_as_matmul import conv1x1_for_build

        deploy_mod, named_weights = conv1x1_for_build(deploy_mod, named_weights, spec)
        # the other float convs read weight panels cut here (EDGECC_PACK_CONV=0: off)
        from edgecc.ir_passes.pack_conv_weights import pack_conv_for_build

        deploy_mod, named_weights = pack_conv_for_build(deploy_mod, named_weights, spec)
    return pack_for_build(deploy_mod, named_weights, spec)


def check_build_request(target: str, out_dir, force: bool) -> tuple[TargetSpec, Path]:
    """Fail before any work on an unknown target, an existing -o without --force, or missing build tools."""
    out_dir = Path(out_dir)
    spec = get_target(target)
    art.check_output_dir(out_dir, force)
    require_build_tools(spec)
    return spec, out_dir


def stage_timer(say: Progress, timings: dict[str, float]):
    """A context manager factory: `with stage("lower"):` announces the stage and records its seconds."""

    @contextlib.contextmanager
    def stage(name: str):
        say(name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 3)

    return stage


def target_manifest(spec: TargetSpec, tvm_target) -> dict:
    """The manifest's "target" section."""
    return {
        "name": spec.name,
        "arch": spec.arch,
        "device": spec.device,
        "features": list(spec.features),
        "vector_bits": spec.vector_bits,
        "tvm_target": json.loads(str(tvm_target)),
        "plugin": spec.plugin,
    }


def compile_executable(lowered, spec: TargetSpec, tvm_target, **kwargs):
    """`relax.build` of a lowered module, with edgecc's TIR pipeline for CPU targets (parallel loops steal work:
    `ir_passes/work_stealing.py`); `_export_library` links the helper those kernels call."""
    from tvm import relax

    from edgecc.ir_passes.work_stealing import tir_pipeline

    return relax.build(lowered, tvm_target, relax_pipeline=None, tir_pipeline=tir_pipeline(spec), **kwargs)


def cpu_addons(spec: TargetSpec) -> list[str]:
    """Objects every CPU artifact links: the work-stealing helper (`runtime_bridge/parallel_runtime.py`)."""
    if spec.device != "cpu":
        return []
    from edgecc.runtime_bridge.parallel_runtime import parallel_object

    return [str(parallel_object(spec))]


def _export_library(executable, path: Path, spec: TargetSpec) -> None:
    import tvm

    addons = cpu_addons(spec)
    if spec.cross_compiler:
        cross = tvm.support.cc.cross_compiler(spec.cross_compiler)

        # Without `get_target_triple` TVM writes the constants of a module with no LLVM code of its own as C
        # (devc.c) and compiles it with the cross compiler. With it, it asked the *host* gcc (x86_64) and
        # built devc.o for the host; a target triple alone would still miss the float ABI (riscv64 lp64d).
        def fcompile(outputs, objects, options=None):
            return cross(outputs, objects, options)

        fcompile.output_format = getattr(cross, "output_format", "so")
        executable.export_library(str(path), fcompile=fcompile, addons=addons)
    else:
        executable.export_library(str(path), addons=addons)


def build_artifact(
    onnx_path: str | Path,
    out_dir: str | Path,
    target: str = "host",
    dims: dict[str, int] | None = None,
    force: bool = False,
    schedules: bool = True,
    progress: Progress | None = None,
    tuning_db: str | Path | None = None,
    quantize: str | None = None,
    emit: str = "shared",
    embed_params: bool = False,
    method: str | None = None,
    calib: str | Path | None = None,
    calib_text: str | Path | None = None,
) -> BuildResult:
    """Compile `onnx_path` for `target` into `out_dir` (see module docstring for the stages).

    `method` (rtn|gptq|awq|smoothquant) with `calib` (.npz of inputs) or `calib_text` (.txt, models taking
    input_ids with a tokenizer.json beside them): how `quantize` picks the codes (docs/compression.md).

    `tuning_db`: a MetaSchedule database from `edgecc tune` (default: the target's own database, when it
    has records); its tuned kernels replace the default schedules where the fused function matches.
    """
    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    spec, out_dir = check_build_request(target, out_dir, force)
    from edgecc.runtime_bridge import firmware  # --emit / --embed-params: docs/firmware.md

    firmware.check_options(spec, emit, embed_params)

    stage = stage_timer(say, timings)

    with stage("load"):
        model = load_model(onnx_path)
        onnx_sig = read_signature(model)
        built_sig = bind_dims(onnx_sig, dims or {})
        bounds = index_bounds(model)

    with stage("import"):
        from edgecc.frontend.importer import import_model

        imported = import_model(model, built_sig)
        del model

    with stage("weights"):
        deploy_mod, transform_mod, named_weights = lift_weight_transforms(imported)

    from edgecc.compress.quantize import imported_compression

    compression = imported_compression(deploy_mod)  # ops the model brought quantized (docs/compression.md)
    if quantize:  # a scheme ("w4g32") or a recipe file: see edgecc/compress and docs/compression.md
        with stage("compress"):
            from edgecc.compress.quantize import compress_for_build

            deploy_mod, named_weights, compression = compress_for_build(
                deploy_mod, named_weights, quantize, transform_mod, [n for n, _ in imported.params],
                method=method, calibration=(onnx_path, calib, calib_text, None))

    deploy_mod, named_weights = rewrite_weights(deploy_mod, named_weights, spec)
    with stage("lower"):
        from edgecc.ir_passes.memory_plan import module_memory
        from edgecc.ir_passes.pipeline import relax_pipeline
        from edgecc.schedules.tuning import (count_default_faster, count_tuned_functions, database_summary,
                                             resolve_database_dir)

        tvm_target = spec.tvm()
        tuning_dir = resolve_database_dir(spec, tuning_db) if schedules else None
        lowered = relax_pipeline(spec, with_schedules=schedules, tuning_db=tuning_db)(deploy_mod)
        memory = module_memory(lowered)
        from edgecc.ir_passes.unaligned_inputs import inputs_any_alignment

        input_alignment = "element" if inputs_any_alignment(lowered) else "64"
        tuned = (count_tuned_functions(lowered), count_default_faster(lowered))

    with stage("codegen"):
        executable = compile_executable(lowered, spec, tvm_target)

    with art.atomic_directory(out_dir, force=force) as tmp:
        with stage("link"):
            _export_library(executable, tmp / art.LIBRARY, spec)
        with stage("params"):
            write_params(tmp / art.PARAMS, named_weights)
        weights_bytes = int(sum(w.nbytes for _, w in named_weights))
        arena = {name: m.arena_bytes for name, m in memory.items()}
        manifest = {
            "format": art.FORMAT,
            "model": {"file": Path(onnx_path).name, "sha256": art.sha256_file(Path(onnx_path))},
            "signature": {"onnx": onnx_sig.to_json(), "built": built_sig.to_json(), "dims": dict(dims or {}),
                          "index_bounds": bounds,
                          # "element": numpy's buffers go to the kernels as they are (ir_passes/unaligned_inputs)
                          "input_alignment": input_alignment},
            "entry": "main",
            "target": target_manifest(spec, tvm_target),
            "params": [{"name": n, "dtype": str(w.dtype), "shape": list(w.shape)} for n, w in named_weights],
            "compression": compression,
            "schedules": {"enabled": schedules, "tuning_db": database_summary(tuning_dir, *tuned)},
            "memory": {
                "weights_bytes": weights_bytes,
                "arena_bytes": arena,
                "dynamic_blocks": {name: m.dynamic_blocks for name, m in memory.items()},
                "total_bytes": weights_bytes + max(arena.values(), default=0),
            },
            "versions": _versions(),
            "files": {
                name: {"sha256": art.sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in (art.LIBRARY, art.PARAMS)
            },
        }
        with stage("firmware"):
            manifest.update(firmware.package(tmp, manifest, spec=spec, emit=emit, embed_params=embed_params,
                                             lowered=lowered, tvm_target=tvm_target))
        art.write_manifest(tmp, manifest)
    return BuildResult(out_dir, manifest, timings)
