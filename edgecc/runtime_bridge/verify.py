"""`edgecc verify`: run an artifact and onnxruntime on the same inputs and compare every output.

Inputs are random by default — floats from a standard normal, integer inputs drawn inside the range the
graph can index with (an input that feeds a Gather's indices stays below that table's size; a mask-like
input is all ones) — or given by the user as an .npz.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgecc.errors import EdgeccError
from edgecc.frontend.signature import Signature, index_bounds
from edgecc.runtime_bridge.tolerances import Tolerance, tolerance_for


@dataclass(frozen=True)
class OutputReport:
    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    cosine: float
    tolerance: Tolerance
    passed: bool

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "cosine": self.cosine, "passed": self.passed}


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> OutputReport:
    tol = tolerance_for(str(ref.dtype))
    if got.shape != ref.shape:
        return OutputReport(name, str(ref.dtype), tuple(ref.shape), float("inf"), float("inf"), 0.0, tol, False)
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if g.size == 0:
        return OutputReport(name, str(ref.dtype), tuple(ref.shape), 0.0, 0.0, 1.0, tol, True)
    finite = np.isfinite(r)
    same_nonfinite = bool(np.array_equal(np.isfinite(g), finite)
                          and np.array_equal(g[~finite], r[~finite], equal_nan=True))  # NaN where NaN is expected
    diff = np.abs(g[finite] - r[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    gn, rn = np.linalg.norm(g[finite]), np.linalg.norm(r[finite])
    if gn == 0 and rn == 0:
        cosine = 1.0
    elif gn == 0 or rn == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(g[finite], r[finite]) / (gn * rn))
    passed = same_nonfinite and max_abs <= tol.atol + tol.rtol * scale and cosine >= tol.min_cosine
    return OutputReport(name, str(ref.dtype), tuple(ref.shape), max_abs, max_rel, cosine, tol, passed)


def random_feeds(signature: Signature, model: onnx.ModelProto | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    bounds = index_bounds(model) if model is not None else {}
    feeds = {}
    for t in signature.inputs:
        shape = tuple(int(d) for d in t.shape)
        dtype = np.dtype(t.dtype) if t.dtype != "bfloat16" else np.dtype("float32")
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[t.name] = rng.random(shape) < 0.5
        elif "mask" in t.name.lower():
            feeds[t.name] = np.ones(shape, dtype=dtype)
        else:
            high = bounds.get(t.name, 2)
            feeds[t.name] = rng.integers(0, max(1, high), size=shape).astype(dtype)
    return feeds


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise EdgeccError(f"inputs file '{path}' does not exist", "pass an .npz written with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for a bad file
        raise EdgeccError(f"'{path}' is not a readable .npz ({type(exc).__name__})",
                          "write inputs with numpy.savez(path, name=array, ...)") from exc


def onnxruntime_reference(onnx_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def verify(artifact_dir: str | Path, onnx_path: str | Path, feeds: dict[str, np.ndarray] | None = None,
           seed: int = 0) -> tuple[list[OutputReport], dict[str, np.ndarray]]:
    """Returns one report per output (in signature order) and the feeds used."""
    from edgecc.frontend.loader import load_model
    from edgecc.runtime_bridge.host import load_artifact

    artifact = load_artifact(artifact_dir)
    sub = [t.name for t in artifact.signature.inputs + artifact.signature.outputs if t.element is not None]
    if sub:  # onnxruntime's Python API rejects ml_dtypes int4/float4 arrays ("Numpy_type ... MLDataType")
        raise EdgeccError(f"the model's inputs/outputs {sub} are sub-byte tensors, which onnxruntime's Python API "
                          "cannot take or return", "compare against onnx.reference.ReferenceEvaluator instead "
                          "(edgecc passes them one element per byte: docs/verification.md)")
    model = load_model(onnx_path)
    if feeds is None:
        feeds = random_feeds(artifact.signature, model, seed)
    got = artifact.run(feeds)
    ref = onnxruntime_reference(onnx_path, feeds)
    missing = [n for n in got if n not in ref]
    if missing:
        raise EdgeccError(f"the artifact's outputs {missing} are not outputs of {Path(onnx_path).name}",
                          "verify the artifact against the ONNX file it was built from")
    return [compare(name, got[name], ref[name]) for name in got], feeds
