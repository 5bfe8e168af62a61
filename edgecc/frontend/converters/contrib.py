"""onnxruntime contrib ops (com.microsoft) that real exported models use and TVM 0.27 lacks.

* `MatMulNBits`: blockwise 2/4/8-bit weights (`B` [N, k_blocks, blob], low bits first), `scales`
  [N * k_blocks], optional packed uint8 or float `zero_points` (default 2^(bits-1)), optional `bias`;
  `Y = A @ dequant(B)^T`. The dequantization is written on the weights only, so `edgecc build` lifts it
  out of the deployed graph (LiftTransformParams) — the artifact stores the dequantized weight, not the
  packed one (the compression passes, not the importer, own packed kernels). `g_idx` is not supported.
* `SimplifiedLayerNormalization` (RMSNorm; onnxruntime registers it in the default domain) and
  `SkipSimplifiedLayerNormalization` (`s = input + skip (+ bias)`, RMSNorm of s; outputs y, -, inv_std, s).
"""

from __future__ import annotations

from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, num_outputs, present, static_shape
from edgecc.frontend.converters.standard import rms_norm


def _unpack(bb, packed, bits: int, rows: int):
    """uint8 [rows, nbytes] -> values [rows, nbytes * 8/bits], lowest bits first, as int32."""
    per = 8 // bits
    p = cast(bb, packed, "int32")
    if per == 1:
        return p
    parts = [relax.op.bitwise_and(relax.op.right_shift(p, const(i * bits, "int32")), const((1 << bits) - 1, "int32"))
             for i in range(per)]
    stacked = emit(bb, relax.op.stack(parts, axis=-1))
    return emit(bb, relax.op.reshape(stacked, [rows, -1]))


@register("MatMulNBits", "com.microsoft")
def matmul_nbits(bb, inputs, attrs, params, opset):
    a, b, scales = inputs[0], inputs[1], inputs[2]
    if present(inputs, 4):
        raise ValueError("MatMulNBits with g_idx (act-order) is not supported")
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits with bits={bits} is not supported")
    k_blocks = (k + block - 1) // block
    q = _unpack(bb, emit(bb, relax.op.reshape(b, [n, -1])), bits, n)  # [N, k_blocks * block]
    q = emit(bb, relax.op.reshape(q, [n, k_blocks, block]))
    wdt = dtype_of(scales)
    s = emit(bb, relax.op.reshape(scales, [n, k_blocks, 1]))
    if present(inputs, 3) and dtype_of(inputs[3]) == "uint8":
        zp = _unpack(bb, emit(bb, relax.op.reshape(inputs[3], [n, -1])), bits, n)
        zp = emit(bb, relax.op.strided_slice(zp, axes=[1], begin=[0], end=[k_blocks]))
        zp = cast(bb, emit(bb, relax.op.reshape(zp, [n, k_blocks, 1])), wdt)
    elif present(inputs, 3):
        zp = emit(bb, relax.op.reshape(inputs[3], [n, k_blocks, 1]))
    else:
        zp = const(float(1 << (bits - 1)), wdt)
    w = emit(bb, relax.op.multiply(relax.op.subtract(cast(bb, q, wdt), zp), s))
    w = emit(bb, relax.op.reshape(w, [n, k_blocks * block]))
    if k_blocks * block != k:
        w = emit(bb, relax.op.strided_slice(w, axes=[1], begin=[0], end=[k]))
    w = cast(bb, w, dtype_of(a))
    y = emit(bb, relax.op.matmul(a, relax.op.permute_dims(w, [1, 0])))
    if present(inputs, 5):
        y = emit(bb, relax.op.add(y, inputs[5]))
    return y


def _last_axes(x, axis: int) -> list[int]:
    rank = len(static_shape(x) or []) or x.ty.ndim
    axis = axis + rank if axis < 0 else axis
    return list(range(axis, rank))


@register("SimplifiedLayerNormalization", "", "com.microsoft")
def simplified_layer_norm(bb, inputs, attrs, params, opset):
    x = inputs[0]
    y, inv = rms_norm(bb, x, inputs[1], _last_axes(x, int(attrs.get("axis", -1))),
                      float(attrs.get("epsilon", 1e-5)), attrs)
    return y if num_outputs(attrs) == 1 else relax.Tuple([y, inv][: num_outputs(attrs)])


@register("SkipSimplifiedLayerNormalization", "com.microsoft")
def skip_simplified_layer_norm(bb, inputs, attrs, params, opset):
    s = emit(bb, relax.op.add(inputs[0], inputs[1]))
    if present(inputs, 3):
        s = emit(bb, relax.op.add(s, inputs[3]))
    y, inv = rms_norm(bb, s, inputs[2], _last_axes(s, -1), float(attrs.get("epsilon", 1e-5)), attrs)
    if num_outputs(attrs) == 1:
        return y
    return relax.Tuple([y, inv, inv, s][: num_outputs(attrs)])
