"""The model's signature: what goes in and out, with symbolic dims kept by name.

The signature is read from the ONNX graph (not from the compiled module) so that the manifest states the
contract of the original model — `input_ids: int64 [batch, sequence]` — next to the concrete shapes the
artifact was built for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from edgecc.errors import EdgeccError

Dim = int | str  # a fixed size, or the name of a symbolic dim


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output. `dtype` is what crosses the boundary (numpy name: "float32", "int64", ...);
    `element` is the ONNX element type when it differs: a sub-byte tensor (int4, uint4, int2, uint2,
    float4_e2m1fn) crosses as one value per byte in `dtype` (see `edgecc.frontend.subbyte`)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    element: str | None = None

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def concrete(self, dims: dict[str, int]) -> "TensorSig":
        return replace(self, shape=tuple(dims.get(d, d) if isinstance(d, str) else d for d in self.shape))

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.element is not None:
            out["element"] = self.element
        return out

    @staticmethod
    def from_json(data: dict) -> "TensorSig":
        return TensorSig(data["name"], data["dtype"], tuple(data["shape"]), data.get("element"))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]

    def symbolic_dims(self) -> list[str]:
        seen: list[str] = []
        for t in self.inputs + self.outputs:
            for d in t.shape:
                if isinstance(d, str) and d not in seen:
                    seen.append(d)
        return seen

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @staticmethod
    def from_json(data: dict) -> "Signature":
        return Signature(tuple(TensorSig.from_json(t) for t in data["inputs"]),
                         tuple(TensorSig.from_json(t) for t in data["outputs"]))


def _elem_dtype(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_sig(value: onnx.ValueInfoProto, index: int) -> TensorSig:
    from edgecc.frontend.subbyte import SUBBYTE

    ttype = value.type.tensor_type
    dims: list[Dim] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(f"{value.name or f'arg{index}'}_dim{i}")
    sub = SUBBYTE.get(ttype.elem_type)
    if sub is not None:
        return TensorSig(value.name, sub.container, tuple(dims), sub.name)
    return TensorSig(value.name, _elem_dtype(ttype.elem_type), tuple(dims))


def read_signature(model: onnx.ModelProto) -> Signature:
    """Graph inputs that are not initializers (old exporters list weights as inputs too), and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_value_sig(v, i) for i, v in enumerate(model.graph.input) if v.name not in initializers)
    outputs = tuple(_value_sig(v, i) for i, v in enumerate(model.graph.output))
    return Signature(inputs, outputs)


def parse_dim_bindings(items: list[str] | tuple[str, ...]) -> dict[str, int]:
    """`--dim batch=1 --dim sequence=128` -> {"batch": 1, "sequence": 128}."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise EdgeccError(f"bad --dim '{item}'", "write it as NAME=SIZE with a positive integer, e.g. batch=1")
        out[name.strip()] = int(value)
    return out


def bind_dims(sig: Signature, dims: dict[str, int]) -> Signature:
    """Give every symbolic input dim a size; an unbound one is a user error that lists what to pass."""
    unknown = [d for d in dims if d not in sig.symbolic_dims()]
    if unknown:
        known = ", ".join(sig.symbolic_dims()) or "none"
        raise EdgeccError(f"--dim names {', '.join(unknown)}, which the model does not have",
                          f"the model's symbolic dims are: {known}")
    bound = Signature(tuple(t.concrete(dims) for t in sig.inputs), tuple(t.concrete(dims) for t in sig.outputs))
    missing = [d for t in bound.inputs for d in t.shape if isinstance(d, str)]
    if missing:
        names = list(dict.fromkeys(missing))
        example = " ".join(f"--dim {d}=1" if "batch" in d.lower() else f"--dim {d}=128" for d in names)
        raise EdgeccError(f"the model's inputs have symbolic dims {', '.join(names)} without a size",
                          f"give each a size for this build, e.g. {example}")
    return bound



def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used as Gather/GatherElements indices into a weight -> size of the indexed axis.

    The compiled gather does not check its indices (TVM's fast `take`): a token id past the vocabulary would
    read out of bounds. Recording the bound lets `run` reject such inputs with a clear error instead.
    """
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    inputs = {v.name for v in model.graph.input}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Gather", "GatherElements") and len(node.input) > 1 and node.input[0] in inits \
                and node.input[1] in inputs:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits[node.input[0]]
            if dims:
                size = int(dims[axis])
                bounds[node.input[1]] = min(bounds.get(node.input[1], size), size)
    return bounds
