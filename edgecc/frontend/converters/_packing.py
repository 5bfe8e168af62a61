"""Weights an ONNX model already quantized -> edgecc's packed storage, written as Relax ops on the weights.

The converters of pre-quantized forms (MatMulNBits, DequantizeLinear -> MatMul/Gemm, MatMulInteger,
GatherBlockQuantized) emit `edgecc.quantized_matmul` / `edgecc.quantized_gather` whose packed operands are
computed from the model's own initializers by the functions here: integer reshapes, adds, shifts and ors
only, so the codes are the model's codes bit for bit.
Every one of them depends on weights alone, so `edgecc build` lifts them (LiftTransformParams) and runs them
once at build time, exactly like the transposed weight of a Gemm: params.bin holds the repacked tensors,
never a float copy. Layouts: `edgecc.compress.schemes` (logical [rows, N], stored tile-major [N/T, rows, T]).
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax

from edgecc.compress.schemes import QuantScheme, column_tile
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, static_shape


def constant_value(expr, params) -> np.ndarray | None:
    """The numpy value of an ONNX initializer (a weight parameter of main) or a constant, else None."""
    if isinstance(expr, tvm.ir.Constant) and hasattr(expr, "value"):
        return expr.value.numpy()
    if isinstance(expr, relax.Var) and params is not None:
        entry = params[1].get(expr.name)
        if entry is not None and entry[0].same_as(expr):
            return entry[1].numpy()
    return None


def is_weight(expr, params) -> bool:
    """True for an initializer / constant with a static shape (something LiftTransformParams can lift)."""
    if static_shape(expr) is None:
        return False
    if isinstance(expr, tvm.ir.Constant):
        return True
    return isinstance(expr, relax.Var) and params is not None and expr.name in params[1] \
        and params[1][expr.name][0].same_as(expr)


def node_name(attrs, fallback: str = "?") -> str:
    """The ONNX node's name (what `edgecc inspect` shows for a pre-quantized layer)."""
    name = attrs.get("tvm_custom", {}).get("name", "") if hasattr(attrs, "get") else ""
    if isinstance(name, bytes):
        name = name.decode()
    return str(name) or fallback


def var_name(layer: str, key: str) -> str:
    """Binding name of a packed tensor: LiftTransformParams names the deployed parameter after it."""
    return re.sub(r"[^0-9A-Za-z_]", "_", f"{layer.strip('/')}.{key}")


def tile_n_major(bb, n_by_rows, n: int, name: str):
    """[N, rows] (ONNX's per-output-channel layout) -> tile-major [N / T, rows, T], bound to `name`."""
    rows = static_shape(n_by_rows)[1]
    t = column_tile(n)
    x = emit(bb, relax.op.reshape(n_by_rows, [n // t, t, rows]))
    return bb.emit(relax.op.permute_dims(x, [0, 2, 1]), name)


def bytes_to_words(bb, u8, n: int):
    """uint8 [N, nbytes] (a little-endian bitstream per row) -> uint32 [N, nbytes / 4], the same stream.

    A MatMulNBits blob stores code k of a column at bits k*bits.. of its byte stream, lowest bits first; an
    edgecc uint32 word w holds bits 32w.. of the same stream (`pack_bits`), so word w = bytes 4w..4w+3."""
    nbytes = static_shape(u8)[1]
    b = emit(bb, relax.op.reshape(cast(bb, u8, "uint32"), [n, nbytes // 4, 4]))
    word = None
    for i in range(4):
        part = emit(bb, relax.op.reshape(relax.op.strided_slice(b, axes=[2], begin=[i], end=[i + 1]),
                                         [n, nbytes // 4]))
        if i:
            part = emit(bb, relax.op.left_shift(part, const(8 * i, "uint32")))
        word = part if word is None else emit(bb, relax.op.bitwise_or(word, part))
    return word


def unpack_low_first(bb, u8, bits: int, n: int, count: int):
    """uint8 [N, nbytes] of `bits`-bit values, lowest bits first -> uint8 [N, count]."""
    per = 8 // bits
    p = cast(bb, u8, "int32")
    if per > 1:
        parts = [relax.op.bitwise_and(relax.op.right_shift(p, const(i * bits, "int32")),
                                      const((1 << bits) - 1, "int32")) for i in range(per)]
        p = emit(bb, relax.op.reshape(emit(bb, relax.op.stack(parts, axis=-1)), [n, -1]))
    if static_shape(p)[1] != count:
        p = emit(bb, relax.op.strided_slice(p, axes=[1], begin=[0], end=[count]))
    return cast(bb, p, "uint8")


def shift_codes(bb, codes, offset: int):
    """Signed codes q -> uint8 q + offset: int8 + 128 (asymmetric 8-bit storage), int4 + 8 / int2 + 2
    (sub-byte storage holds unsigned codes; the symmetric kernels subtract the same offset)."""
    return cast(bb, emit(bb, relax.op.add(cast(bb, codes, "int32"), const(offset, "int32"))), "uint8")


def flip_sign_bit(bb, int8_codes):
    """int8 q -> uint8 q + 128 (same bits with the top one flipped), for asymmetric 8-bit storage."""
    return shift_codes(bb, int8_codes, 128)


def pack_codes(bb, codes, bits: int, n: int):
    """Unsigned codes [N, K] (one per byte, < 2^bits; bits 2 or 4) -> uint32 [N, K * bits / 32]: code k of a
    column at bits k*bits.. of its stream, lowest first (edgecc's `pack_bits` layout, see bytes_to_words)."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit codes straddle words; only 2- and 4-bit codes are packed here")
    per = 32 // bits
    k = static_shape(codes)[1]
    c = emit(bb, relax.op.reshape(cast(bb, codes, "uint32"), [n, k // per, per]))
    word = None
    for i in range(per):
        part = emit(bb, relax.op.reshape(relax.op.strided_slice(c, axes=[2], begin=[i], end=[i + 1]), [n, k // per]))
        if i:
            part = emit(bb, relax.op.left_shift(part, const(i * bits, "uint32")))
        word = part if word is None else emit(bb, relax.op.bitwise_or(word, part))
    return word


def annotation(scheme: QuantScheme, k: int, n: int, name: str, source: str, orig_dtype: str = "float32") -> dict:
    """The annotation dict of one pre-quantized layer (same keys as the --quantize pass writes)."""
    return dict(scheme.to_attrs(), in_features=k, out_features=n, name=name, orig_dtype=orig_dtype,
                orig_bytes=k * n * np.dtype(orig_dtype).itemsize, packed_bytes=scheme.packed_nbytes(k, n),
                source=source)


def scheme_for(bits: int, group: int, symmetric: bool) -> QuantScheme | None:
    """The edgecc scheme for `bits` with groups of `group` along K (or per channel), or None if none fits."""
    try:
        return QuantScheme(bits=bits, group_size=group, symmetric=symmetric)
    except Exception:  # noqa: BLE001 - EdgeccError for a group edgecc's storage cannot hold
        return None


def float32(bb, expr):
    return cast(bb, expr, "float32") if dtype_of(expr) != "float32" else expr
