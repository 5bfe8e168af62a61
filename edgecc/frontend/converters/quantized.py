"""Integer and quantized ops: QDQ per-tensor, per-axis and blocked; QLinearMatMul; QLinearConv; ConvInteger.

TVM 0.27's `QuantizeLinear` / `DequantizeLinear` reject `block_size` and mishandle nothing else that the
ONNX cases could show (they were all gated by opset); the ones here cover per-tensor, per-axis and blocked
scales/zero points for 8- and 16-bit integer types with plain Relax arithmetic (`(x - zp) * scale`,
`clip(round(x / scale) + zp)` with round-half-to-even), so fusion sees ordinary elementwise ops. Float8 and
sub-byte types are left to TVM's converters (`NotImplemented`). `QLinearMatMul`, `QLinearConv` and
`ConvInteger` (absent from TVM) accumulate in int32 exactly as the ONNX reference does, then requantize.
"""

from __future__ import annotations

import onnx
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, dtype_of, emit, present, static_shape

_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
           "int32": (-(2**31), 2**31 - 1)}


def _onnx_dtype(code: int) -> str:
    import numpy as np

    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(code))))


def _param_for(bb, p, x_shape: list[int], axis: int, block: int):
    """Reshape/repeat a scale or zero point so that it broadcasts against x."""
    pshape = static_shape(p)
    if pshape is None:
        raise ValueError("quantization parameters need static shapes")
    rank = len(x_shape)
    if len(pshape) == 0 or (block == 0 and len(pshape) == 1 and pshape[0] == 1) or rank == 0:
        return p
    if block == 0:
        shape = [1] * rank
        shape[axis] = pshape[0]
        return emit(bb, relax.op.reshape(p, shape))
    rep = emit(bb, relax.op.repeat(p, block, axis))
    if pshape[axis] * block != x_shape[axis]:
        rep = emit(bb, relax.op.strided_slice(rep, axes=[axis], begin=[0], end=[x_shape[axis]]))
    return rep


def _axis(attrs, rank: int) -> int:
    axis = int(attrs.get("axis", 1))
    return axis + rank if axis < 0 else axis


@register("DequantizeLinear")
def dequantize_linear(bb, inputs, attrs, params, opset):
    x, scale = inputs[0], inputs[1]
    x_shape = static_shape(x)
    if dtype_of(x) not in _RANGES or x_shape is None:
        return NotImplemented
    axis, block = _axis(attrs, len(x_shape)), int(attrs.get("block_size", 0))
    out_dtype = _onnx_dtype(attrs["output_dtype"]) if attrs.get("output_dtype") else dtype_of(scale)
    xf = cast(bb, x, "float32")
    if present(inputs, 2):
        zp = cast(bb, _param_for(bb, inputs[2], x_shape, axis, block), "float32")
        xf = emit(bb, relax.op.subtract(xf, zp))
    s = cast(bb, _param_for(bb, scale, x_shape, axis, block), "float32")
    return cast(bb, emit(bb, relax.op.multiply(xf, s)), out_dtype)


@register("QuantizeLinear")
def quantize_linear(bb, inputs, attrs, params, opset):
    x, scale = inputs[0], inputs[1]
    x_shape = static_shape(x)
    if attrs.get("output_dtype"):
        out_dtype = _onnx_dtype(attrs["output_dtype"])
    else:
        out_dtype = dtype_of(inputs[2]) if present(inputs, 2) else "uint8"
    if out_dtype not in _RANGES or x_shape is None:
        return NotImplemented
    axis, block = _axis(attrs, len(x_shape)), int(attrs.get("block_size", 0))
    s = cast(bb, _param_for(bb, scale, x_shape, axis, block), "float32")
    q = emit(bb, relax.op.round(relax.op.divide(cast(bb, x, "float32"), s)))
    if present(inputs, 2):
        q = emit(bb, relax.op.add(q, cast(bb, _param_for(bb, inputs[2], x_shape, axis, block), "float32")))
    lo, hi = _RANGES[out_dtype]
    return emit(bb, relax.op.astype(relax.op.clip(q, lo, hi), out_dtype))


def _centered(bb, x, zp, zp_shape_fn=None):
    """x - zp in int32 (zp optional; reshaped by zp_shape_fn when per-row/per-channel)."""
    xi = cast(bb, x, "int32")
    if zp is None:
        return xi
    zi = cast(bb, zp, "int32")
    if zp_shape_fn is not None:
        zi = zp_shape_fn(zi)
    return emit(bb, relax.op.subtract(xi, zi))


def _requantize(bb, acc, real_scale, y_zp, out_dtype):
    y = emit(bb, relax.op.round(relax.op.multiply(cast(bb, acc, "float32"), real_scale)))
    if y_zp is not None:
        y = emit(bb, relax.op.add(y, cast(bb, y_zp, "float32")))
    lo, hi = _RANGES[out_dtype]
    return emit(bb, relax.op.astype(relax.op.clip(y, lo, hi), out_dtype))


def _per_row(bb, p, rank: int):
    """A 1-D per-row parameter of A [.., M, K] -> [M, 1]; scalars unchanged."""
    shape = static_shape(p) or []
    if len(shape) == 1 and shape[0] > 1 and rank >= 2:
        return emit(bb, relax.op.reshape(p, [shape[0], 1]))
    return p


@register("QLinearMatMul")
def qlinear_matmul(bb, inputs, attrs, params, opset):
    a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (inputs[i] if present(inputs, i) else None for i in range(8))
    rank = len(static_shape(a) or [0, 0])
    ai = _centered(bb, a, a_zp, lambda z: _per_row(bb, z, rank))
    bi = _centered(bb, b, b_zp)
    acc = emit(bb, relax.op.matmul(ai, bi, out_dtype="int32"))
    f = lambda e: cast(bb, e, "float32")  # noqa: E731
    real = emit(bb, relax.op.divide(relax.op.multiply(_per_row(bb, f(a_s), rank), f(b_s)), f(y_s)))
    return _requantize(bb, acc, real, y_zp, dtype_of(y_zp) if y_zp is not None else "uint8")


def _conv_int32(bb, x, w, x_zp, w_zp, attrs):
    w_shape = static_shape(w)
    if w_shape is None or len(w_shape) != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("only 2-D convolutions with explicit pads are supported")
    per_channel = lambda z: (emit(bb, relax.op.reshape(z, [w_shape[0], 1, 1, 1]))  # noqa: E731
                             if len(static_shape(z) or []) == 1 and (static_shape(z) or [1])[0] > 1 else z)
    xi = _centered(bb, x, x_zp)
    wi = _centered(bb, w, w_zp, per_channel)
    pads = list(attrs.get("pads", (0, 0, 0, 0)))
    return emit(bb, relax.op.nn.conv2d(xi, wi, strides=list(attrs.get("strides", (1, 1))), padding=pads,
                                       dilation=list(attrs.get("dilations", (1, 1))),
                                       groups=int(attrs.get("group", 1)), out_dtype="int32"))


@register("ConvInteger")
def conv_integer(bb, inputs, attrs, params, opset):
    x_zp = inputs[2] if present(inputs, 2) else None
    w_zp = inputs[3] if present(inputs, 3) else None
    return _conv_int32(bb, inputs[0], inputs[1], x_zp, w_zp, attrs)


@register("QLinearConv")
def qlinear_conv(bb, inputs, attrs, params, opset):
    x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (inputs[i] if present(inputs, i) else None for i in range(8))
    acc = _conv_int32(bb, x, w, x_zp, w_zp, attrs)
    if present(inputs, 8):
        acc = emit(bb, relax.op.add(acc, relax.op.reshape(cast(bb, inputs[8], "int32"), [1, -1, 1, 1])))
    f = lambda e: cast(bb, e, "float32")  # noqa: E731
    ws = f(w_s)
    if len(static_shape(ws) or []) == 1 and (static_shape(ws) or [1])[0] > 1:
        ws = emit(bb, relax.op.reshape(ws, [1, -1, 1, 1]))
    real = emit(bb, relax.op.divide(relax.op.multiply(f(x_s), ws), f(y_s)))
    return _requantize(bb, acc, real, y_zp, dtype_of(y_zp) if y_zp is not None else "uint8")
