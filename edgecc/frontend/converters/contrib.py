"""onnxruntime contrib ops (com.microsoft) that real exported models use and TVM 0.27 lacks.

* `MatMulNBits`: blockwise 2/4/8-bit weights (`B` [N, k_blocks, blob], low bits first), `scales`
  [N * k_blocks], optional packed uint8 or float `zero_points` (default 2^(bits-1)), optional `bias`;
  `Y = A @ dequant(B)^T`. With constant B/scales/zero points, K a multiple of block_size and block_size a
  multiple of 32, it becomes `edgecc.quantized_matmul` with scheme `w<bits>g<block>` (no zero points:
  symmetric, whose implicit zero 2^(bits-1) is onnxruntime's default) or `w<bits>g<block>-asym` (uint8
  zero points): B's byte stream *is* edgecc's uint32 bitstream, so the codes are reused bit for bit
  (`_packing.py`; the repacking is lifted to build time). `accuracy_level` is ignored (edgecc keeps x in
  float). Any other form (float zero points, block 16, ragged K, computed weights) keeps the dequantize +
  matmul lowering (lifted too: the artifact then stores the dequantized float weight). `g_idx` is not
  supported.
* `SimplifiedLayerNormalization` (RMSNorm; onnxruntime registers it in the default domain) and
  `SkipSimplifiedLayerNormalization` (`s = input + skip (+ bias)`, RMSNorm of s; outputs y, -, inv_std, s).
"""

from __future__ import annotations

from tvm import relax

from edgecc.frontend.converters import _packing as pk
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


def _nbits_packed(bb, inputs, attrs, params, k: int, n: int, bits: int, block: int):
    """MatMulNBits -> edgecc.quantized_matmul when the weights map onto an edgecc scheme, else None."""
    b, scales = inputs[1], inputs[2]
    zp = inputs[3] if present(inputs, 3) else None
    if k % block or int(attrs.get("weight_prepacked", 0)):
        return None
    if not all(pk.is_weight(t, params) for t in (b, scales) + ((zp,) if zp is not None else ())):
        return None
    if zp is not None and dtype_of(zp) != "uint8":
        return None  # float zero points: not on an integer grid
    scheme = pk.scheme_for(bits, block, symmetric=zp is None)
    if scheme is None or scheme.check_shape(k, n):
        return None
    k_blocks = k // block
    raw = emit(bb, relax.op.reshape(b, [n, k * bits // 8]))
    if bits == 8:
        codes = raw  # uint8 codes with uint8 zero points: edgecc's w8-asym storage as is
        if zp is None:  # default zero point 128: edgecc's symmetric w8 stores the signed q = u8 - 128
            codes = cast(bb, emit(bb, relax.op.subtract(cast(bb, raw, "int32"), const(128, "int32"))), "int8")
    else:
        codes = pk.bytes_to_words(bb, raw, n)
    name = pk.node_name(attrs, "MatMulNBits")
    qweight = pk.tile_n_major(bb, codes, n, pk.var_name(name, "qweight"))
    s = pk.tile_n_major(bb, pk.float32(bb, emit(bb, relax.op.reshape(scales, [n, k_blocks]))), n,
                        pk.var_name(name, "scales"))
    zeros = None
    if zp is not None:
        z = pk.unpack_low_first(bb, emit(bb, relax.op.reshape(zp, [n, -1])), bits, n, k_blocks)
        zeros = pk.tile_n_major(bb, z, n, pk.var_name(name, "zeros"))
    from edgecc.ir_passes.compression import quantized_matmul

    ann = pk.annotation(scheme, k, n, name, "MatMulNBits")
    return emit(bb, quantized_matmul(inputs[0], qweight, s, zeros, ann))


@register("MatMulNBits", "com.microsoft")
def matmul_nbits(bb, inputs, attrs, params, opset):
    a, b, scales = inputs[0], inputs[1], inputs[2]
    if present(inputs, 4):
        raise ValueError("MatMulNBits with g_idx (act-order) is not supported")
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits with bits={bits} is not supported")
    y = _nbits_packed(bb, inputs, attrs, params, k, n, bits, block)
    if y is not None:
        return emit(bb, relax.op.add(y, inputs[5])) if present(inputs, 5) else y
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
