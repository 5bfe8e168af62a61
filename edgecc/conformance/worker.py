"""One conformance case, start to finish, in a worker process: import, build, run, compare.

Stages, in order, and what a failure in each means:

    import     the case cannot become a Relax module: ONNX checker / opset, graph inputs or outputs that are
               not tensors, no converter for the op, or the converter raised
    build      the Relax pipeline (legalize, fuse, schedule, lower) or codegen/link failed
    run        the compiled module raised (or crashed) on the case's inputs
    numerics   it ran, but an output differs from the case's expected output beyond the tolerance of
               `edgecc.runtime_bridge.tolerances` (or has the wrong shape or dtype)

Host cases take a fast path: the same frontend, weight lifting and `relax_pipeline(spec)` as
`edgecc build`, then `relax.build` and the Relax VM in this process (no library export, no artifact
directory). Cross targets build a real artifact with `build_artifact` and run it with `load_artifact`, i.e.
under qemu-user. `report_stage(name)` is called as each stage starts, so that the parent can name the
stage of a case that timed out or crashed.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

STAGES = ("import", "build", "run", "numerics")
_MAX_REASON = 240


class StageError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def short_reason(exc: BaseException) -> str:
    """The most telling single line of an exception (TVM errors put it last), trimmed."""
    from edgecc.errors import EdgeccError

    if isinstance(exc, EdgeccError):
        text = exc.problem
    else:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        text = next((ln for ln in reversed(lines) if not ln.startswith(("File ", "at ", "^", "~"))),
                    lines[-1] if lines else "")
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _check_tensor_io(model: onnx.ModelProto) -> None:
    for kind, infos in (("input", model.graph.input), ("output", model.graph.output)):
        for info in infos:
            t = info.type
            if not t.HasField("tensor_type"):
                which = t.WhichOneof("value")
                raise StageError("import", f"graph {kind} '{info.name}' is a {which.replace('_type', '')}: "
                                           "edgecc artifacts take and return tensors only")


def _signature_of(model: onnx.ModelProto):
    from edgecc.frontend.signature import read_signature

    sig = read_signature(model)
    if not all(t.is_static for t in sig.inputs):
        raise StageError("import", "an input has no static shape")
    return sig


class _HostModule:
    """Compiled in this process: frontend -> weights lifted -> edgecc pipeline -> relax.build -> VM."""

    def __init__(self, model_path: Path, spec, report_stage: Callable[[str], None]):
        from edgecc.frontend.loader import load_model

        report_stage("import")
        try:
            model = load_model(model_path)
            _check_tensor_io(model)
            self.signature = _signature_of(model)
            from edgecc.frontend.importer import import_model

            imported = import_model(model, self.signature)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StageError("import", short_reason(exc)) from exc
        report_stage("build")
        try:
            import tvm
            from tvm import relax

            from edgecc.build import _run_weight_transforms, _split_transform_params
            from edgecc.ir_passes.pipeline import relax_pipeline
            from edgecc.targets.byoc import offload_summary

            deploy_mod, transform_mod = _split_transform_params(imported.mod)
            weights = [w for _, w in imported.params]
            if transform_mod is not None:
                weights = _run_weight_transforms(transform_mod, weights)
            lowered = relax_pipeline(spec)(deploy_mod)
            self.offload = offload_summary(lowered)  # vendor (BYOC) targets: which ops left the CPU
            executable = relax.build(lowered, spec.tvm(), relax_pipeline=None)
            self.vm = relax.VirtualMachine(executable, tvm.cpu())
            self.weights = [tvm.runtime.tensor(w) for w in weights]
        except Exception as exc:  # noqa: BLE001
            raise StageError("build", short_reason(exc)) from exc

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        from edgecc.runtime_bridge.host import _flatten, check_feeds

        args = [tvm.runtime.tensor(x) for x in check_feeds(self.signature, feeds)]
        return [t.numpy() for t in _flatten(self.vm["main"](*args, *self.weights))]


class _ArtifactModule:
    """Cross targets: a real artifact directory from `build_artifact`, run through `load_artifact`."""

    _BUILD_STAGES = {"load": "import", "import": "import"}

    def __init__(self, model_path: Path, spec, report_stage: Callable[[str], None], workdir: Path):
        from edgecc.build import build_artifact
        from edgecc.runtime_bridge.host import load_artifact

        current = {"stage": "import"}

        def progress(name: str) -> None:
            current["stage"] = self._BUILD_STAGES.get(name, "build")
            report_stage(current["stage"])

        report_stage("import")
        try:
            model = onnx.load(str(model_path))
            _check_tensor_io(model)
            out = workdir / "artifact"
            build_artifact(model_path, out, target=spec.name, force=True, progress=progress)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StageError(current["stage"], short_reason(exc)) from exc
        self.artifact = load_artifact(out, num_threads=1)
        self.names = [t.name for t in self.artifact.signature.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.artifact.run(feeds)
        return [result[n] for n in self.names]


def _compare_outputs(names: list[str], got: list[np.ndarray], expected: dict[str, np.ndarray],
                     data_set: str) -> list[dict]:
    from edgecc.frontend.subbyte import to_container
    from edgecc.runtime_bridge.verify import compare

    figures = []
    if len(got) != len(names):
        raise StageError("numerics", f"module returned {len(got)} outputs, the case has {len(names)}")
    for name, value in zip(names, got):
        if name not in expected:
            continue
        ref = to_container(np.asarray(expected[name]))  # sub-byte outputs come back in byte containers
        entry = {"data_set": data_set, "output": name, "dtype": str(ref.dtype), "shape": list(ref.shape)}
        if value.dtype != ref.dtype:
            entry.update(passed=False, problem=f"dtype {value.dtype}, expected {ref.dtype}")
        else:
            try:
                rep = compare(name, value, ref)
            except Exception as exc:  # noqa: BLE001 - e.g. string outputs
                entry.update(passed=False, problem=f"cannot compare: {short_reason(exc)}")
            else:
                entry.update(max_abs_err=rep.max_abs_err, max_rel_err=rep.max_rel_err, cosine=rep.cosine,
                             atol=rep.tolerance.atol, rtol=rep.tolerance.rtol,
                             min_cosine=rep.tolerance.min_cosine, passed=rep.passed)
                if value.shape != ref.shape:
                    entry["problem"] = f"shape {list(value.shape)}, expected {list(ref.shape)}"
                elif not rep.passed:
                    entry["problem"] = (f"max abs err {rep.max_abs_err:.3g} (bound {rep.tolerance.atol:g} + "
                                        f"{rep.tolerance.rtol:g}*max|ref|), cosine {rep.cosine:.6f}")
        figures.append(entry)
    return figures


def _record_offload(result: dict, module) -> None:
    """`offloaded`: None for targets without BYOC (or cross targets, built as artifacts), else the sorted
    pattern names of the ops the vendor codegen took ([] = everything fell back to the CPU)."""
    info = getattr(module, "offload", None)
    if info is not None:
        result["offloaded"] = sorted(set(result["offloaded"] or []) | set(info["offloaded"]))


def run_case(case: dict, target: str, strict: bool = False,
             report_stage: Callable[[str], None] = lambda _s: None) -> dict:
    """Run one case ({"name", "dir", "op"}) for `target`; returns the result record (see report.py)."""
    from edgecc.conformance.cases import base_frozen_names, read_data_set, static_model
    from edgecc.frontend.subbyte import to_container
    from edgecc.targets.registry import get_target

    t0 = time.perf_counter()
    current = ["import"]

    def stage(name: str) -> None:
        current[0] = name
        report_stage(name)

    result = {"name": case["name"], "op": case["op"], "outcome": "pass", "stage": None, "reason": None,
              "frozen": [], "outputs": [], "offloaded": None}
    try:
        spec = get_target(target)
        case_dir = Path(case["dir"])
        stage("import")
        try:
            model = onnx.load(str(case_dir / "model.onnx"))
        except Exception as exc:  # noqa: BLE001
            raise StageError("import", short_reason(exc)) from exc
        data_sets = sorted(case_dir.glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        if not data_sets:
            raise StageError("import", "the case has no test_data_set_*")
        also_freeze = base_frozen_names(case_dir)
        built: dict[str, object] = {}
        with tempfile.TemporaryDirectory(prefix="edgecc-conf-") as tmp:
            for ds_dir in data_sets:
                try:
                    data = read_data_set(model, ds_dir)
                    _check_tensor_io(model)
                    static = static_model(model, data, strict=strict, also_freeze=also_freeze)
                except StageError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise StageError("import", short_reason(exc)) from exc
                result["frozen"] = sorted(set(result["frozen"]) | set(data.frozen))
                blob = static.SerializeToString()
                key = hashlib.sha256(blob).hexdigest()
                if key not in built:
                    work = Path(tmp) / f"m{len(built)}"
                    work.mkdir()
                    path = work / "model.onnx"
                    path.write_bytes(blob)
                    if spec.is_cross or spec.device != "cpu":
                        built[key] = _ArtifactModule(path, spec, stage, work)
                    else:
                        built[key] = _HostModule(path, spec, stage)
                module = built[key]
                _record_offload(result, module)
                feeds = {k: to_container(v) for k, v in data.inputs.items() if k not in data.frozen}
                stage("run")
                try:
                    got = module.run(feeds)
                except Exception as exc:  # noqa: BLE001
                    raise StageError("run", short_reason(exc)) from exc
                stage("numerics")
                names = [o.name for o in model.graph.output]
                figures = _compare_outputs(names, got, data.outputs, data.name)
                result["outputs"].extend(figures)
        bad = [f for f in result["outputs"] if not f["passed"]]
        if bad:
            first = bad[0]
            more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            raise StageError("numerics", f"output '{first['output']}' {first['dtype']} "
                                         f"{first['shape']}: {first.get('problem', 'mismatch')}{more}")
    except StageError as exc:
        result.update(outcome="fail", stage=exc.stage, reason=exc.reason)
    except Exception as exc:  # noqa: BLE001 - a bug in this harness: still one failed case, not a dead run
        result.update(outcome="fail", stage=current[0], reason="harness error: " + short_reason(exc))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
