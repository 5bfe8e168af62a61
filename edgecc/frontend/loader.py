"""Load an ONNX file the way a compiler should: check everything before trusting anything.

Each failure a user can cause — no such file, not ONNX, truncated, external weights missing, a model the
checker rejects, an opset the importer does not know — becomes an `EdgeccError` naming the fix.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from edgecc.errors import EdgeccError

# Older models are upgraded to OPSET_UPGRADE_TO, which every converter handles. Up to the newest opset the
# installed onnx knows, a model is accepted: each converter picks its newest version at or below the model's
# opset, and an op whose semantics changed later than any converter version is reported per node by
# op_support.find_unsupported, before import.
OPSET_MIN = 7
OPSET_UPGRADE_TO = 13
OPSET_MAX = onnx.defs.onnx_opset_version()


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _check_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in onnx.external_data_helper._get_all_tensors(model):  # noqa: SLF001 - the stable way
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = base_dir / info.location
        if not location.is_file():
            raise EdgeccError(
                f"{path.name}: external data file '{info.location}' for tensor '{tensor.name}' is missing",
                f"put '{info.location}' next to {path.name} (in {base_dir})",
            )
        needed = (info.offset or 0) + (info.length or 0)
        if info.length and location.stat().st_size < needed:
            raise EdgeccError(
                f"{path.name}: external data file '{info.location}' is truncated "
                f"({location.stat().st_size} bytes, tensor '{tensor.name}' needs {needed})",
                "re-export the model or copy the complete data file",
            )


def load_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Read, validate and (if old) opset-upgrade an ONNX model, with its external data loaded."""
    path = Path(path)
    if not path.exists():
        raise EdgeccError(f"model file '{path}' does not exist", "check the path")
    if path.is_dir():
        raise EdgeccError(f"'{path}' is a directory, not an ONNX file", "pass the .onnx file inside it")
    raw = path.read_bytes()
    if not raw:
        raise EdgeccError(f"'{path}' is empty", "re-export the model")
    try:
        model = onnx.load_from_string(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise EdgeccError(
            f"'{path}' is not a readable ONNX model (corrupt or truncated: {type(exc).__name__})",
            "re-export it, or check that the download/copy completed",
        ) from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise EdgeccError(
            f"'{path}' parsed but holds no ONNX graph (not an ONNX file, or truncated)",
            "pass a model exported by torch.onnx / an ONNX converter",
        )
    _check_external_data(model, path.parent, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise EdgeccError(f"{path.name}: cannot read external data: {exc}", "re-export the model") from exc
    if check:
        try:
            # Large models must be checked by path (the in-memory checker stops at 2 GB).
            if model.ByteSize() > 2**31 - 1:
                onnx.checker.check_model(str(path))
            else:
                onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
            raise EdgeccError(
                f"{path.name} fails the ONNX checker: {first}",
                "fix the exporter output (onnx.checker.check_model shows the details)",
            ) from exc
    opset = default_opset(model)
    if opset > OPSET_MAX:
        raise EdgeccError(
            f"{path.name} uses ONNX opset {opset}; edgecc's importer handles opsets {OPSET_MIN}..{OPSET_MAX}",
            f"re-export with opset <= {OPSET_MAX}",
        )
    if opset < OPSET_MIN:
        try:
            model = onnx.version_converter.convert_version(model, OPSET_UPGRADE_TO)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            raise EdgeccError(
                f"{path.name} uses ONNX opset {opset} and could not be upgraded to {OPSET_UPGRADE_TO}: {exc}",
                f"re-export with opset >= {OPSET_MIN}",
            ) from exc
    from edgecc.frontend.normalize import normalize

    return normalize(model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, best effort: a model it cannot fully infer still imports."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return model
