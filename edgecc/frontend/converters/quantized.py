"""Integer and quantized ops: QDQ per-tensor, per-axis and blocked; QLinearMatMul; QLinearConv; ConvInteger.

TVM 0.27's `QuantizeLinear` / `DequantizeLinear` reject `block_size` and mishandle nothing else that the
ONNX cases could show (they were all gated by opset); the ones here cover per-tensor, per-axis and blocked
scales/zero points for 8- and 16-bit integer types with plain Relax arithmetic (`(x - zp) * scale`,
`clip(round(x / scale) + zp)` with round-half-to-even), so fusion sees ordinary elementwise ops. Float8 and
sub-byte types are left to TVM's converters (`NotImplemented`). `QLinearMatMul`, `QLinearConv` and
`ConvInteger` (absent from TVM) accumulate in int32 exactly as the ONNX reference does, then requantize.

Models quantized by onnxruntime's tools map onto edgecc's packed kernels (`edgecc.quantized_matmul`,
docs/compression.md "Models that are already quantized") instead of a float copy of the weight:

* QDQ weights: `DequantizeLinear` of a constant int8/uint8 2-D weight (per tensor, per output channel, or
  blocked along the reduction axis) feeding `MatMul` / `Gemm` (directly, through a Transpose, or as a Gemm's
  transB operand) -> `w8[g<block>]` (int8, zero points all 0) or `w8[g<block>]-asym`. int4/uint4 (and
  int2/uint2) weights arrive as byte containers from the sub-byte path, which passes their type: they map
  to `w4[g<block>]` / `w4[g<block>]-asym` the same way (signed codes and zero points stored + 2^(bits-1),
  packed into uint32 words), or keep 8-bit storage where 4-bit storage cannot hold the group (a K that
  fills no whole word). A block spanning all of K counts as per channel. The DequantizeLinear
  converter still emits the float dequantization (another consumer may need it) and remembers its operands;
  the MatMul/Gemm converters look them up and emit the packed op, leaving the float weight dead (removed
  before the weights are lifted). Activation QDQ pairs stay as they are: fake quantization in float.
* `MatMulInteger(A, B, a_zp, b_zp)` with a constant int8/uint8 B (what `quantize_dynamic` emits after
  `DynamicQuantizeLinear`): `w8` / `w8-asym` codes with unit scales, fed `float(A - a_zp)`; the kernel's
  float sums are the integer sums (exact while they stay below 2^24 in magnitude), rounded back to int32. The activation
  grid stays onnxruntime's (uint8, per tensor) rather than edgecc's w8a8 (int8, per row), so the results
  equal onnxruntime's int32 accumulator. `DynamicQuantizeLinear` itself is converted here with onnxruntime's
  arithmetic (TVM's adds the zero point before rounding and divides by a zero scale on an all-zero input).
"""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm import relax

from edgecc.frontend.converters import _packing as pk
from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, present, static_shape

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
def dequantize_linear(bb, inputs, attrs, params, opset, sub=None):
    """`sub`: the int4/uint4/int2/uint2 type (edgecc.frontend.subbyte) when x is a byte container of one."""
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
    out = cast(bb, emit(bb, relax.op.multiply(xf, s)), out_dtype)
    if len(x_shape) == 2 and dtype_of(x) in ("int8", "uint8") and pk.is_weight(x, params) \
            and pk.is_weight(scale, params) and (not present(inputs, 2) or pk.is_weight(inputs[2], params)):
        _remember(params, out, {"q": x, "scale": scale, "zp": inputs[2] if present(inputs, 2) else None,
                                "axis": axis, "block": block, "shape": x_shape, "bits": sub.bits if sub else 8})
    return out


# ------------------------------------------------------------------------ QDQ weights -> packed kernels

_TRACK: dict = {"graph": None, "weights": {}}


def _remember(params, out, info: dict) -> None:
    """Record a dequantized constant weight (keyed by its output; reset for every imported graph)."""
    if _TRACK["graph"] is not params[0]:
        _TRACK.update(graph=params[0], weights={})
    _TRACK["weights"][out] = info


def _bound(bb, expr):
    """The value a Var is bound to in this builder (the expression itself otherwise, or None)."""
    if not isinstance(expr, relax.Var):
        return expr
    try:
        return bb.lookup_binding(expr)
    except Exception:  # noqa: BLE001 - not bound in this builder
        return None


def _entry(bb, table: dict, expr):
    """The remembered info of `expr`: a DequantizeLinear output as the converter returned it (a Call, not
    yet emitted) or the Var TVM's importer later bound it to (e.g. before its Transpose converter)."""
    if expr in table:
        return table[expr]
    bound = _bound(bb, expr) if isinstance(expr, relax.Var) else None
    return table.get(bound) if bound is not None else None


def _tracked(bb, params, expr):
    """(DequantizeLinear info, transposed) when `expr` is a remembered weight or its 2-D transpose."""
    if _TRACK["graph"] is not params[0]:
        return None, False
    table = _TRACK["weights"]
    info = _entry(bb, table, expr)
    if info is not None:
        return info, False
    bound = _bound(bb, expr)
    if (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == "relax.permute_dims"
            and (bound.attrs.axes is None or [int(a) for a in bound.attrs.axes] == [1, 0])):
        info = _entry(bb, table, bound.args[0])
        if info is not None:
            return info, True
    return None, False


def _per_n(bb, p, n: int, n_major: bool, per_tensor: bool):
    """A scale / zero point as [N, groups] (N-major, for `tile_n_major`)."""
    if per_tensor:
        return emit(bb, relax.op.broadcast_to(emit(bb, relax.op.reshape(p, [1, 1])), [n, 1]))
    shape = static_shape(p)
    if len(shape) == 1:
        return emit(bb, relax.op.reshape(p, [n, 1]))
    return p if n_major else emit(bb, relax.op.permute_dims(p, [1, 0]))


def _dq_scheme(info: dict, k: int, n: int, group: int, symmetric: bool):
    """The scheme of a DequantizeLinear weight: its own width (4-bit codes -> w4...), else the 8-bit one
    (a sub-byte code is also an 8-bit code: a group edgecc's 2/4-bit storage cannot hold, such as a
    per-channel group of K codes that does not fill whole uint32 words, keeps the codes at 8 bits)."""
    for bits in dict.fromkeys((info["bits"], 8)):
        scheme = pk.scheme_for(bits, group, symmetric)
        if scheme is not None and not scheme.check_shape(k, n):
            return scheme
    return None


def _packed_from_dq(bb, params, info: dict, n_major: bool, name: str, source: str):
    """(qweight, scales, zeros or None, annotation) of a DequantizeLinear weight, or None when the
    quantization does not map onto an edgecc scheme (blocks or channels along the wrong axis)."""
    rows, cols = info["shape"]
    k, n = (cols, rows) if n_major else (rows, cols)
    k_axis, n_axis = (1, 0) if n_major else (0, 1)
    sshape = static_shape(info["scale"])
    per_tensor = len(sshape) == 0 or (len(sshape) == 1 and sshape[0] == 1 and n != 1)
    block = info["block"]
    if per_tensor:
        group = -1
    elif block == 0 and info["axis"] == n_axis and len(sshape) == 1:
        group = -1
    elif block and info["axis"] == k_axis and len(sshape) == 2 and block >= k:
        group = -1  # one block spans K (onnxruntime's channel-wise QDQ: block_size = K): per channel
    elif block and info["axis"] == k_axis and len(sshape) == 2 and k % block == 0:
        group = block
    else:
        return None
    q, zp, qdt = info["q"], info["zp"], dtype_of(info["q"])
    signed = qdt == "int8"  # the container of int4/int2 is int8, of uint4/uint2 uint8
    zvals = pk.constant_value(zp, params) if zp is not None else None
    symmetric = signed and (zvals is None or not np.any(zvals))
    scheme = _dq_scheme(info, k, n, group, symmetric)
    if scheme is None:
        return None
    codes = q if n_major else emit(bb, relax.op.permute_dims(q, [1, 0]))  # [N, K]
    if scheme.bits < 8:
        # unsigned codes: int q + 2^(b-1) (the symmetric offset; asymmetric zeros get the same shift),
        # uint q as is; then K codes per column into uint32 words, low bits first
        if signed:
            codes = pk.shift_codes(bb, codes, 1 << (scheme.bits - 1))
        codes = pk.pack_codes(bb, codes, scheme.bits, n)
    elif signed and not symmetric:
        codes = pk.flip_sign_bit(bb, codes)
    qweight = pk.tile_n_major(bb, codes, n, pk.var_name(name, "qweight"))
    s = _per_n(bb, pk.float32(bb, info["scale"]), n, n_major, per_tensor)
    scales = pk.tile_n_major(bb, s, n, pk.var_name(name, "scales"))
    zeros = None
    if not symmetric:
        groups = k // scheme.group_for(k)
        if zp is None:
            z = const(np.zeros((n, groups), np.uint8), "uint8")
        else:
            z = _per_n(bb, zp, n, n_major, per_tensor)
            if signed:
                z = pk.shift_codes(bb, z, 128 if scheme.bits == 8 else 1 << (scheme.bits - 1))
        zeros = pk.tile_n_major(bb, z, n, pk.var_name(name, "zeros"))
    return qweight, scales, zeros, pk.annotation(scheme, k, n, name, source)


def _quantized_linear(bb, params, x, w, n_major_default: bool, attrs, source: str):
    """x @ W through the packed kernel when W is a remembered DequantizeLinear weight, else None."""
    info, transposed = _tracked(bb, params, w)
    x_shape = static_shape(x)
    if info is None or (x_shape is not None and len(x_shape) < 2) or x.ty.ndim < 2 or dtype_of(x) != "float32":
        return None
    packed = _packed_from_dq(bb, params, info, n_major_default != transposed, pk.node_name(attrs, source), source)
    if packed is None:
        return None
    from edgecc.ir_passes.compression import quantized_matmul

    return emit(bb, quantized_matmul(x, *packed))


@register("MatMul")
def matmul_qdq(bb, inputs, attrs, params, opset):
    y = _quantized_linear(bb, params, inputs[0], inputs[1], False, attrs, "QDQ MatMul")
    return NotImplemented if y is None else y


@register("Gemm")
def gemm_qdq(bb, inputs, attrs, params, opset):
    if int(attrs.get("transA", 0)):
        return NotImplemented
    y = _quantized_linear(bb, params, inputs[0], inputs[1], bool(int(attrs.get("transB", 0))), attrs, "QDQ Gemm")
    if y is None:
        return NotImplemented
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = emit(bb, relax.op.multiply(y, const(alpha, "float32")))
    if present(inputs, 2) and beta != 0.0:
        c = inputs[2] if beta == 1.0 else emit(bb, relax.op.multiply(inputs[2], const(beta, dtype_of(inputs[2]))))
        y = emit(bb, relax.op.add(y, c))
    return y


@register("MatMulInteger")
def matmul_integer(bb, inputs, attrs, params, opset):
    """Constant int8/uint8 B -> the w8 kernel on float(A - a_zp) (see module docstring); else TVM's."""
    a, b = inputs[0], inputs[1]
    a_zp = inputs[2] if present(inputs, 2) else None
    b_zp = inputs[3] if present(inputs, 3) else None
    bshape, qdt = static_shape(b), dtype_of(b)
    if (bshape is None or len(bshape) != 2 or qdt not in ("int8", "uint8") or not pk.is_weight(b, params)
            or a.ty.ndim < 2 or (b_zp is not None and not pk.is_weight(b_zp, params))):
        return NotImplemented
    zshape = static_shape(a_zp) if a_zp is not None else []
    if zshape is None or int(np.prod(zshape)) != 1:
        return NotImplemented  # per-row activation zero points
    k, n = bshape
    zvals = pk.constant_value(b_zp, params) if b_zp is not None else None
    if zvals is not None and zvals.size not in (1, n):
        return NotImplemented
    symmetric = qdt == "int8" and (zvals is None or not np.any(zvals))
    scheme = pk.scheme_for(8, -1, symmetric)
    name = pk.node_name(attrs, "MatMulInteger")
    codes = emit(bb, relax.op.permute_dims(b, [1, 0]))  # [N, K]
    if qdt == "int8" and not symmetric:
        codes = pk.flip_sign_bit(bb, codes)
    qweight = pk.tile_n_major(bb, codes, n, pk.var_name(name, "qweight"))
    scales = pk.tile_n_major(bb, const(np.ones((n, 1), np.float32), "float32"), n, pk.var_name(name, "scales"))
    zeros = None
    if not symmetric:
        if b_zp is None:
            z = const(np.zeros((n, 1), np.uint8), "uint8")
        else:
            z = emit(bb, relax.op.broadcast_to(emit(bb, relax.op.reshape(b_zp, [-1, 1])), [n, 1]))
            z = pk.flip_sign_bit(bb, z) if qdt == "int8" else z
        zeros = pk.tile_n_major(bb, z, n, pk.var_name(name, "zeros"))
    x = cast(bb, a, "float32")
    if a_zp is not None:
        x = emit(bb, relax.op.subtract(x, cast(bb, emit(bb, relax.op.reshape(a_zp, [])), "float32")))
    from edgecc.ir_passes.compression import quantized_matmul

    ann = pk.annotation(scheme, k, n, name, "MatMulInteger", orig_dtype=qdt)
    y = emit(bb, quantized_matmul(x, qweight, scales, zeros, ann))
    return cast(bb, emit(bb, relax.op.round(y)), "int32")


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


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(bb, inputs, attrs, params, opset):
    """uint8 per-tensor quantization with onnxruntime's arithmetic: scale = (max(x, 0) - min(x, 0)) / 255,
    zp = round(clip(-min / scale)), y = clip(round(x / scale) + zp), rounding half to even (TVM's converter
    adds zp before rounding, which moves ties). An all-zero x gets scale 1 rather than a division by 0."""
    x = cast(bb, inputs[0], "float32")
    zero = const(0.0, "float32")
    hi = emit(bb, relax.op.maximum(zero, relax.op.max(x)))
    lo = emit(bb, relax.op.minimum(zero, relax.op.min(x)))
    span = emit(bb, relax.op.divide(relax.op.subtract(hi, lo), const(255.0, "float32")))
    scale = emit(bb, relax.op.where(relax.op.equal(span, zero), const(1.0, "float32"), span))
    zp = emit(bb, relax.op.round(relax.op.clip(relax.op.subtract(zero, relax.op.divide(lo, scale)), 0, 255)))
    q = emit(bb, relax.op.add(relax.op.round(relax.op.divide(x, scale)), zp))
    y = emit(bb, relax.op.astype(relax.op.clip(q, 0, 255), "uint8"))
    return relax.Tuple([y, cast(bb, scale, dtype_of(inputs[0])), cast(bb, zp, "uint8")])


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
