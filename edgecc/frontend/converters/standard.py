"""Default-domain ops TVM 0.27's importer gets wrong.

* `Shape` of a statically shaped tensor becomes an int64 constant tensor. TVM returns a `ShapeExpr`, which
  only a dozen converters accept ("Node cannot handle ShapeExpr inputs" for Not, Sub, Size, ... — every
  `*_expanded` LayerNormalization / RMSNormalization / Attention case); edgecc builds static shapes anyway.
* `Constant` with `value_float(s)` / `value_int(s)` (TVM reads only `value`).
* `LayerNormalization` with its optional `Mean` / `InvStdDev` outputs (TVM returns a scalar for them);
  with one output TVM's converter is kept.
* `RMSNormalization` (opset 23) for any `axis` (TVM's fails to build unless axis is the last one).
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, num_outputs, present, static_shape


@register("Shape")
def shape(bb, inputs, attrs, params, opset):
    dims = static_shape(inputs[0])
    if dims is None:
        return NotImplemented
    rank = len(dims)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else int(end)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return const(np.array(dims[start:end], dtype=np.int64), "int64")


@register("Constant")
def constant(bb, inputs, attrs, params, opset):
    if "value_float" in attrs:
        return const(np.float32(attrs["value_float"]), "float32")
    if "value_floats" in attrs:
        return const(np.array(attrs["value_floats"], dtype=np.float32), "float32")
    if "value_int" in attrs:
        return const(np.int64(attrs["value_int"]), "int64")
    if "value_ints" in attrs:
        return const(np.array(attrs["value_ints"], dtype=np.int64), "int64")
    return NotImplemented


def _norm_axes(x, axis: int) -> list[int]:
    rank = len(static_shape(x) or []) or x.ty.ndim
    axis = axis + rank if axis < 0 else axis
    return list(range(axis, rank))


def _stash(bb, x, attrs):
    """Inputs are normalised in float32 when stash_type=1 (the default)."""
    return cast(bb, x, "float32") if int(attrs.get("stash_type", 1)) == 1 else x


@register("LayerNormalization")
def layer_norm(bb, inputs, attrs, params, opset):
    if num_outputs(attrs) == 1:
        return NotImplemented
    x, scale = inputs[0], inputs[1]
    out_dtype = dtype_of(x)
    axes = _norm_axes(x, int(attrs.get("axis", -1)))
    eps = float(attrs.get("epsilon", 1e-5))
    xs = _stash(bb, x, attrs)
    sdt = dtype_of(xs)
    mean = emit(bb, relax.op.mean(xs, axes, keepdims=True))
    diff = emit(bb, relax.op.subtract(xs, mean))
    var = emit(bb, relax.op.mean(relax.op.multiply(diff, diff), axes, keepdims=True))
    inv = emit(bb, relax.op.rsqrt(relax.op.add(var, const(eps, sdt))))
    y = cast(bb, emit(bb, relax.op.multiply(diff, inv)), out_dtype)
    y = relax.op.multiply(y, scale)
    if present(inputs, 2):
        y = relax.op.add(y, inputs[2])
    return relax.Tuple([emit(bb, y), mean, inv])


def rms_norm(bb, x, scale, axes, eps, attrs):
    out_dtype = dtype_of(x)
    xs = _stash(bb, x, attrs)
    sdt = dtype_of(xs)
    ms = emit(bb, relax.op.mean(relax.op.multiply(xs, xs), axes, keepdims=True))
    inv = emit(bb, relax.op.rsqrt(relax.op.add(ms, const(eps, sdt))))
    y = cast(bb, emit(bb, relax.op.multiply(xs, inv)), out_dtype)
    return emit(bb, relax.op.multiply(y, scale)), inv


@register("RMSNormalization")
def rms_normalization(bb, inputs, attrs, params, opset):
    axes = _norm_axes(inputs[0], int(attrs.get("axis", -1)))
    y, _ = rms_norm(bb, inputs[0], inputs[1], axes, float(attrs.get("epsilon", 1e-5)), attrs)
    return y
