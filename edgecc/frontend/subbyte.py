"""Sub-byte tensors (int4, uint4, int2, uint2, float4_e2m1fn): one element per byte, inside and at the boundary.

TVM 0.27's CPU runtime cannot copy a sub-byte tensor from or to numpy (`TensorCopyFromBytes: size
mismatch`, `dtype.bits % 8 == 0`) and its float4 casts do not build. So no sub-byte dtype ever reaches TVM:
each such tensor lives in a byte *container*, one element per byte:

    int4, int2       int8   the value, sign-extended          (-8..7, -2..1)
    uint4, uint2     uint8  the value                         (0..15, 0..3)
    float4_e2m1fn    uint8  the 4-bit E2M1 code in bits 0..3  (bit 3 is the sign: 0x7 = 6.0, 0x8 = -0.0)

The same holds at the artifact's boundary: the signature (and the manifest) gives the container as `dtype`
and the ONNX type as `element`, and callers pass and receive container arrays (`to_container` turns the
ml_dtypes arrays that onnx's numpy_helper returns into them). The importer rewrites sub-byte initializers and
Constant tensors to containers and remembers which values are sub-byte (`lower_model`); the ops that change
or interpret the element type (Cast, CastLike, QuantizeLinear, DequantizeLinear) are converted with that
knowledge (`edgecc.frontend.converters.subbyte`), while ops that only move elements (Reshape, Transpose,
Identity, ...) work on containers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


@dataclass(frozen=True)
class SubByte:
    name: str  # the ONNX / ml_dtypes name
    container: str  # numpy dtype that holds one element per byte
    bits: int
    signed: bool
    is_float: bool = False

    @property
    def range(self) -> tuple[int, int]:
        """Integer types: the representable values (QuantizeLinear saturates to them)."""
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1


SUBBYTE: dict[int, SubByte] = {
    TensorProto.INT4: SubByte("int4", "int8", 4, True),
    TensorProto.UINT4: SubByte("uint4", "uint8", 4, False),
    TensorProto.INT2: SubByte("int2", "int8", 2, True),
    TensorProto.UINT2: SubByte("uint2", "uint8", 2, False),
    TensorProto.FLOAT4E2M1: SubByte("float4_e2m1fn", "uint8", 4, True, is_float=True),
}
BY_NAME: dict[str, SubByte] = {s.name: s for s in SUBBYTE.values()}

#: float4_e2m1fn code (0..15) -> value.
FLOAT4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def to_container(value: np.ndarray) -> np.ndarray:
    """A sub-byte numpy array (ml_dtypes int4, float4_e2m1fn, ...) as its container; other arrays unchanged."""
    value = np.asarray(value)
    sub = BY_NAME.get(value.dtype.name)
    if sub is None:
        return value
    if sub.is_float:
        return value.view(np.uint8) & np.uint8(0x0F)
    return value.astype(sub.container)


def from_container(value: np.ndarray, element: str) -> np.ndarray:
    """The inverse of `to_container`: a container array as the ml_dtypes array of `element`."""
    import ml_dtypes

    dt = np.dtype(getattr(ml_dtypes, element))
    value = np.asarray(value)
    if BY_NAME[element].is_float:
        return (value.astype(np.uint8) & np.uint8(0x0F)).view(dt)
    return value.astype(dt)


def _container_tensor(t: TensorProto) -> TensorProto:
    out = numpy_helper.from_array(to_container(numpy_helper.to_array(t)), t.name)
    return out


def _mentions_subbyte(graph: onnx.GraphProto) -> bool:
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.tensor_type.elem_type in SUBBYTE:
            return True
    if any(t.data_type in SUBBYTE for t in graph.initializer):
        return True
    for node in graph.node:
        for a in node.attribute:
            if a.name in ("to", "output_dtype") and a.type == onnx.AttributeProto.INT and a.i in SUBBYTE:
                return True
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in SUBBYTE:
                return True
    return False


def lower_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, SubByte]]:
    """(model with sub-byte initializers/Constant tensors as containers, {value name: its sub-byte type}).

    The model is returned unchanged (not copied) when it has no sub-byte tensor. Value types come from the
    graph's declarations and onnx shape inference (main graph only).
    """
    if not _mentions_subbyte(model.graph):
        return model, {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(out).graph
    except Exception:  # noqa: BLE001 - e.g. > 2 GB; the declared types still count
        inferred = out.graph
    types: dict[str, SubByte] = {}
    for v in list(inferred.input) + list(inferred.output) + list(inferred.value_info):
        sub = SUBBYTE.get(v.type.tensor_type.elem_type)
        if sub is not None:
            types[v.name] = sub
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type in SUBBYTE:
            types[t.name] = SUBBYTE[t.data_type]
            g.initializer[i].CopyFrom(_container_tensor(t))
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in SUBBYTE:
                    types[node.output[0]] = SUBBYTE[a.t.data_type]
                    a.t.CopyFrom(_container_tensor(a.t))
    return out, types
