"""What is in an ONNX model, before compiling it: signature, ops, weights, and what edgecc cannot import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgecc.frontend.loader import default_opset, load_model
from edgecc.frontend.op_support import UnsupportedNode, find_unsupported, op_histogram
from edgecc.frontend.signature import Signature, read_signature


@dataclass
class ModelReport:
    path: Path
    opset: int
    producer: str
    signature: Signature
    op_counts: list[tuple[str, int]]
    param_count: int
    param_bytes: int
    unsupported: list[UnsupportedNode]

    def to_json(self) -> dict:
        return {
            "file": self.path.name, "opset": self.opset, "producer": self.producer,
            "signature": self.signature.to_json(), "ops": dict(self.op_counts),
            "parameters": {"count": self.param_count, "bytes": self.param_bytes},
            "unsupported": [u.describe() for u in self.unsupported],
        }


def _initializer_size(t: onnx.TensorProto) -> tuple[int, int]:
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return count, count * itemsize


def inspect_model(path: str | Path) -> ModelReport:
    model = load_model(path)
    opset = default_opset(model)
    count = nbytes = 0
    for t in model.graph.initializer:
        c, b = _initializer_size(t)
        count, nbytes = count + c, nbytes + b
    return ModelReport(
        path=Path(path),
        opset=opset,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        signature=read_signature(model),
        op_counts=op_histogram(model).most_common(),
        param_count=count,
        param_bytes=nbytes,
        unsupported=find_unsupported(model, opset),
    )
