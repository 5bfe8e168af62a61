"""Cast, CastLike, QuantizeLinear and DequantizeLinear on sub-byte tensors held in byte containers.

See `edgecc.frontend.subbyte` for the representation. Not in the registry: the importer calls `convert`
for a node that reads or writes a sub-byte value, passing the sub-byte type (or None) of each input and
output, since a container (int8) alone cannot tell int4 from int8. Semantics follow the ONNX reference,
i.e. ml_dtypes:

* to an integer sub-byte type: floats are truncated toward zero (NaN and inf give 0), then the value wraps
  to the low `bits` (Cast -9 -> int4 7); QuantizeLinear instead saturates to the type's range;
* to float4_e2m1fn: round to nearest, ties to even, saturating at +-6 (no inf/NaN codes); the sign is
  kept for zero and tiny values (-1e-7 -> -0.0); a NaN becomes -0.0, or +0.0 when its sign bit is set
  (what ml_dtypes does);
* from float4_e2m1fn: a 16-entry table lookup on the code.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from edgecc.frontend.converters._util import cast, const, dtype_of, emit, present, static_shape
from edgecc.frontend.subbyte import FLOAT4_VALUES, SUBBYTE, SubByte

_FLOAT = ("float16", "float32", "float64", "bfloat16")


def _decode_float4(bb, codes):
    table = const(FLOAT4_VALUES, "float32")
    idx = cast(bb, emit(bb, relax.op.bitwise_and(cast(bb, codes, "int32"), const(np.int32(15), "int32"))), "int32")
    return emit(bb, relax.op.take(table, idx, axis=0))


def _encode_float4(bb, x):
    """float tensor -> uint8 float4_e2m1fn codes (see the module docstring for the rounding)."""
    xf = cast(bb, x, "float32")
    dims = static_shape(xf)
    i32 = "int32"
    bits = emit(bb, relax.op.memory.view(xf, dims, i32))
    neg = emit(bb, relax.op.less(bits, const(np.int32(0), i32)))  # the sign bit, also for -0.0 and NaN
    # NaN from the bits: the host pipeline may compile with fast-math, where x != x folds to false
    is_nan = emit(bb, relax.op.greater(relax.op.bitwise_and(bits, const(np.int32(0x7FFFFFFF), i32)),
                                       const(np.int32(0x7F800000), i32)))
    ax = emit(bb, relax.op.minimum(relax.op.abs(xf), const(6.0, "float32")))
    values = FLOAT4_VALUES[:8].astype(np.float64)
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    idx = emit(bb, relax.op.sum(relax.op.astype(relax.op.less(const(mids, "float32"),
                                                              relax.op.expand_dims(ax, -1)), i32), axis=[-1]))
    mids_ext = const(np.append(mids, np.float32(np.inf)), "float32")
    tie = relax.op.equal(relax.op.take(mids_ext, idx, axis=0), ax)
    odd = relax.op.equal(relax.op.bitwise_and(idx, const(np.int32(1), i32)), const(np.int32(1), i32))
    idx = emit(bb, relax.op.where(relax.op.logical_and(tie, odd), relax.op.add(idx, const(np.int32(1), i32)), idx))
    code = emit(bb, relax.op.where(neg, relax.op.bitwise_or(idx, const(np.int32(8), i32)), idx))
    nan_code = relax.op.where(neg, const(np.int32(0), i32), const(np.int32(8), i32))
    code = emit(bb, relax.op.where(is_nan, nan_code, code))
    return cast(bb, code, "uint8")


def _wrap_int(bb, x, sub: SubByte):
    """Integer or float tensor -> the low `sub.bits` of its integer part, in the container."""
    i64 = "int64"
    if dtype_of(x) in _FLOAT:
        xf = cast(bb, x, "float32") if dtype_of(x) != "float64" else x
        if dtype_of(xf) == "float32":
            bits = relax.op.memory.view(xf, static_shape(xf), "int32")
            finite = relax.op.less(relax.op.bitwise_and(bits, const(np.int32(0x7FFFFFFF), "int32")),
                                   const(np.int32(0x7F800000), "int32"))
            xf = emit(bb, relax.op.where(finite, xf, const(0.0, "float32")))
        v = emit(bb, relax.op.astype(relax.op.trunc(xf), i64))
    else:
        v = cast(bb, x, i64)
    mask = const(np.int64((1 << sub.bits) - 1), i64)
    v = emit(bb, relax.op.bitwise_and(v, mask))
    if sub.signed:
        half = const(np.int64(1 << (sub.bits - 1)), i64)
        v = emit(bb, relax.op.subtract(relax.op.bitwise_xor(v, half), half))
    return cast(bb, v, sub.container)


def cast_elements(bb, x, src: SubByte | None, dst: SubByte | str):
    """Cast x (a container when `src` is a sub-byte type) to `dst` (a sub-byte type or a dtype name)."""
    if src is not None and src.is_float:
        x = _decode_float4(bb, x)
    if isinstance(dst, SubByte):
        if dst.is_float:
            return _encode_float4(bb, x)
        return _wrap_int(bb, x, dst)
    if dst == "bool":
        return emit(bb, relax.op.not_equal(x, relax.const(np.zeros((), dtype_of(x)), dtype_of(x))))
    return cast(bb, x, dst)


def _onnx_dtype(code: int) -> str:
    import onnx

    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(code))))


def _quantize(bb, inputs, attrs, out: SubByte):
    from edgecc.frontend.converters.quantized import _axis, _param_for

    x, scale = inputs[0], inputs[1]
    x_shape = static_shape(x)
    if x_shape is None:
        return NotImplemented
    axis, block = _axis(attrs, len(x_shape)), int(attrs.get("block_size", 0))
    s = cast(bb, _param_for(bb, scale, x_shape, axis, block), "float32")
    v = emit(bb, relax.op.divide(cast(bb, x, "float32"), s))
    zp = None
    if present(inputs, 2):
        zp = _param_for(bb, inputs[2], x_shape, axis, block)
        zp = _decode_float4(bb, zp) if out.is_float else cast(bb, zp, "float32")
    if out.is_float:
        if zp is not None:
            v = emit(bb, relax.op.add(v, zp))
        return _encode_float4(bb, v)
    v = emit(bb, relax.op.round(v))
    if zp is not None:
        v = emit(bb, relax.op.add(v, zp))
    lo, hi = out.range
    return emit(bb, relax.op.astype(relax.op.clip(v, lo, hi), out.container))


def _dequantize(bb, inputs, attrs, params, opset, x_type: SubByte):
    from edgecc.frontend.converters.quantized import _axis, _param_for, dequantize_linear

    if not x_type.is_float:
        return dequantize_linear(bb, inputs, attrs, params, opset, sub=x_type)  # containers hold the values
    x, scale = inputs[0], inputs[1]
    x_shape = static_shape(x)
    if x_shape is None:
        return NotImplemented
    axis, block = _axis(attrs, len(x_shape)), int(attrs.get("block_size", 0))
    out_dtype = _onnx_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else dtype_of(scale)
    xf = _decode_float4(bb, x)
    if present(inputs, 2):
        xf = emit(bb, relax.op.subtract(xf, _decode_float4(bb, _param_for(bb, inputs[2], x_shape, axis, block))))
    s = cast(bb, _param_for(bb, scale, x_shape, axis, block), "float32")
    return cast(bb, emit(bb, relax.op.multiply(xf, s)), out_dtype)


def convert(bb, op: str, inputs, attrs, params, opset: int, in_types: list, out_types: list):
    """The node `op` reads or writes a sub-byte value: its Relax expression, or NotImplemented."""
    if op == "Cast":
        to = int(attrs["to"])
        dst = SUBBYTE.get(to) or _onnx_dtype(to)
        if in_types[0] is None and not isinstance(dst, SubByte):
            return NotImplemented
        return cast_elements(bb, inputs[0], in_types[0], dst)
    if op == "CastLike":
        like = in_types[1] if len(in_types) > 1 else None
        dst = like if like is not None else dtype_of(inputs[1])
        return cast_elements(bb, inputs[0], in_types[0], dst)
    if op == "QuantizeLinear":
        out = out_types[0] if out_types else None
        if out is None and attrs.get("output_dtype"):
            out = SUBBYTE.get(int(attrs["output_dtype"]))
        if out is None and len(in_types) > 2:
            out = in_types[2]
        return NotImplemented if out is None else _quantize(bb, inputs, attrs, out)
    if op == "DequantizeLinear" and in_types and in_types[0] is not None:
        return _dequantize(bb, inputs, attrs, params, opset, in_types[0])
    if op == "GatherBlockQuantized" and in_types:  # int4/uint4 tables: the container needs its type
        from edgecc.frontend.converters.contrib import gather_block_quantized

        return gather_block_quantized(bb, inputs, attrs, params, opset, sub=in_types[0])
    return NotImplemented  # ops that only move elements work on the containers (TVM's converters)
