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
* `GatherBlockQuantized`: rows of a table quantized in blocks along `quantize_axis`; `data` is uint8 with
  `bits` (2/4/8) codes packed low bits first along the last axis (MatMulNBits' convention: default zero point
  2^(bits-1), uint8 zero points packed the same way; onnxruntime requires gather_axis 0 and quantize_axis
  last), or int4/uint4 one code per element (default zero point 0, zero points of the data's type).
  `out = (q - zp) * scale` in float, cast to the scales' dtype. A constant 2-D table gathered along axis 0
  and quantized along axis 1, with the block a multiple of 32 (or covering the whole row) and dividing the
  row, becomes `edgecc.quantized_gather` with `w<bits>g<block>` (uint8 without zero points; int4 with
  none or all 0) or `w<bits>g<block>-asym` (the others): the table is stored as the [K = D, N = V] right
  operand edgecc's gather kernel reads, codes repacked bit for bit. Anything else (block 16, a ragged last
  block, other axes, rank > 2, a computed table) is dequantized in full and gathered with `take`: correct,
  but the artifact then stores the float table. Negative indices count from the end; an index out of range
  reads the nearest row in both lowerings (onnxruntime returns a row of zeros; ONNX Gather calls it an
  error).
* `SimplifiedLayerNormalization` (RMSNorm; onnxruntime registers it in the default domain) and
  `SkipSimplifiedLayerNormalization` (`s = input + skip (+ bias)`, RMSNorm of s; outputs y, -, inv_std, s).
"""

from __future__ import annotations

import numpy as np
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


def _gbq_codes(bb, data, sub, bits: int, n: int):
    """GatherBlockQuantized data [V, ...] -> (edgecc storage codes [V, rows], signed) for a 2-D table."""
    if sub is None:  # uint8 bytes: the row is already edgecc's little-endian bitstream (see MatMulNBits)
        if bits == 8:
            return data, False
        return pk.bytes_to_words(bb, data, n), False
    codes = pk.shift_codes(bb, data, 8) if sub.signed else data  # int4 q -> q + 8, uint4 as is
    return pk.pack_codes(bb, codes, 4, n), sub.signed


def _gbq_packed(bb, inputs, attrs, params, sub, bits: int, v: int, d: int, block: int):
    """GatherBlockQuantized of a [V, D] table along axis 0 -> edgecc.quantized_gather, or None."""
    data, idx, scales = inputs[0], inputs[1], inputs[2]
    zp = inputs[3] if present(inputs, 3) else None
    if not all(pk.is_weight(t, params) for t in (data, scales) + ((zp,) if zp is not None else ())):
        return None
    if dtype_of(scales) not in ("float32", "float16"):
        return None
    group = -1 if block >= d else block  # one block per row: per channel
    if group != -1 and d % group:
        return None  # a ragged last block: edgecc's groups are whole
    zvals = pk.constant_value(zp, params) if zp is not None else None
    if sub is None:
        symmetric = zp is None  # default zero point 2^(bits-1): edgecc's symmetric code offset
    else:
        symmetric = sub.signed and (zvals is None or not np.any(zvals))
    scheme = pk.scheme_for(bits, group, symmetric)
    if scheme is None or scheme.check_shape(d, v):
        return None
    groups = d // scheme.group_for(d)
    codes, signed = _gbq_codes(bb, data, sub, bits, v)
    if sub is None and bits == 8 and symmetric:  # u8 - 128: edgecc's int8 storage of w8
        codes = cast(bb, emit(bb, relax.op.subtract(cast(bb, codes, "int32"), const(128, "int32"))), "int8")
    name = pk.node_name(attrs, "GatherBlockQuantized")
    qweight = pk.tile_n_major(bb, codes, v, pk.var_name(name, "qweight"))
    s = pk.tile_n_major(bb, pk.float32(bb, scales), v, pk.var_name(name, "scales"))
    zeros = None
    if not symmetric:
        if zp is None:
            z = const(np.zeros((v, groups), np.uint8), "uint8")
        elif sub is None:
            z = pk.unpack_low_first(bb, zp, bits, v, groups)
        else:
            z = pk.shift_codes(bb, zp, 8) if signed else zp
        zeros = pk.tile_n_major(bb, z, v, pk.var_name(name, "zeros"))
    from edgecc.ir_passes.compression import quantized_gather

    ann = pk.annotation(scheme, d, v, name, "GatherBlockQuantized", orig_dtype=dtype_of(scales))
    return emit(bb, quantized_gather(idx, qweight, s, zeros, ann))


def _gbq_dequantized(bb, inputs, sub, bits: int, shape: list[int], gather_axis: int, quantize_axis: int,
                     block: int):
    """The general case: dequantize the whole table (logical `shape`), then take rows."""
    from edgecc.frontend.converters.quantized import _param_for

    data, idx, scales = inputs[0], inputs[1], inputs[2]
    packed = sub is None and bits < 8  # uint8 bytes holding 8/bits codes along the last axis

    def codes_of(t, last: int):  # packed uint8 along the last axis -> int32 values, `last` of them
        tshape = static_shape(t)
        if not packed:
            return cast(bb, t, "int32")
        rows = int(np.prod(tshape[:-1]))
        q = _unpack(bb, emit(bb, relax.op.reshape(t, [rows, tshape[-1]])), bits, rows)
        if static_shape(q)[1] != last:
            q = emit(bb, relax.op.strided_slice(q, axes=[1], begin=[0], end=[last]))
        return emit(bb, relax.op.reshape(q, list(tshape[:-1]) + [last]))

    sshape = static_shape(scales)
    q = cast(bb, codes_of(data, shape[-1]), "float32")
    if present(inputs, 3):
        zp = cast(bb, codes_of(inputs[3], sshape[-1]), "float32")
        q = emit(bb, relax.op.subtract(q, _param_for(bb, zp, shape, quantize_axis, block)))
    elif sub is None:
        q = emit(bb, relax.op.subtract(q, const(float(1 << (bits - 1)), "float32")))
    w = emit(bb, relax.op.multiply(q, _param_for(bb, pk.float32(bb, scales), shape, quantize_axis, block)))
    w = cast(bb, w, dtype_of(scales))
    dim = const(np.array(shape[gather_axis], dtype_of(idx)), dtype_of(idx))
    zero = const(np.array(0, dtype_of(idx)), dtype_of(idx))
    idx = emit(bb, relax.op.where(relax.op.less(idx, zero), relax.op.add(idx, dim), idx))
    return emit(bb, relax.op.take(w, idx, axis=gather_axis, mode="clip"))


@register("GatherBlockQuantized", "com.microsoft")
def gather_block_quantized(bb, inputs, attrs, params, opset, sub=None):
    """`sub`: the sub-byte type of `data` (int4/uint4, passed by the importer's sub-byte path), None for uint8."""
    data = inputs[0]
    dshape = static_shape(data)
    if dshape is None or static_shape(inputs[2]) is None:
        raise ValueError("GatherBlockQuantized needs static data and scales shapes")
    rank = len(dshape)
    gather_axis = int(attrs.get("gather_axis", 0)) % rank
    quantize_axis = int(attrs.get("quantize_axis", 1)) % rank
    block, bits = int(attrs.get("block_size", 128)), int(attrs.get("bits", 4))
    if sub is not None and (sub.is_float or sub.bits != 4):
        raise ValueError(f"GatherBlockQuantized with {sub.name} data is not supported (int4, uint4 or uint8 only)")
    if sub is None:
        if dtype_of(data) != "uint8" or bits not in (2, 4, 8):
            raise ValueError(f"GatherBlockQuantized with {dtype_of(data)} data and bits={bits} is not supported")
        if gather_axis != 0 or quantize_axis != rank - 1:
            raise ValueError("GatherBlockQuantized with uint8 data needs gather_axis 0 and quantize_axis last")
    else:
        bits = 4
    shape = list(dshape)
    if sub is None:
        shape[-1] = shape[-1] * 8 // bits
    if rank == 2 and gather_axis == 0 and quantize_axis == 1:
        y = _gbq_packed(bb, inputs, attrs, params, sub, bits, shape[0], shape[1], block)
        if y is not None:
            return y
    return _gbq_dequantized(bb, inputs, sub, bits, shape, gather_axis, quantize_axis, block)


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
