"""`Cast` / `CastLike` to and from the float8 types (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ; and to E8M0).

TVM 0.27's float8 conversions on CPU are wrong for the FNUZ formats and round differently from the ONNX
reference (ml_dtypes) for the others. edgecc converts through the bytes instead: decoding is a 256-entry
table lookup on the uint8 view of the tensor; encoding rounds |x| to the nearest representable value by
counting the midpoints below it (ties to the even code), then adds the sign, overflow (saturate clamps to
the largest finite value, as the spec's default; otherwise inf or NaN) and NaN. The tables come from
ml_dtypes, the reference's own float8 implementation.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, static_shape
from edgecc.frontend.converters.standard import onnx_dtype

_F8 = {17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz"}
_TABLES: dict[str, dict] = {}


def _table(name: str) -> dict:
    if name not in _TABLES:
        import ml_dtypes

        dt = np.dtype(getattr(ml_dtypes, name))
        decoded = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
        pos = decoded[:128]
        finite = int(np.argmax(~np.isfinite(pos))) if not np.all(np.isfinite(pos)) else 128
        values = pos[:finite].astype(np.float64)  # codes 0..finite-1, increasing
        mids = (values[:-1] + values[1:]) / 2
        top = values[-1] + (values[-1] - values[-2]) / 2  # the rounding boundary above the largest value
        overflow_at_tie = not np.isfinite(np.float32(top).astype(dt).astype(np.float32))
        nan_code = int(np.flatnonzero(np.isnan(decoded))[0])
        inf_codes = np.flatnonzero(np.isposinf(decoded))
        _TABLES[name] = dict(decoded=decoded, mids=mids.astype(np.float32), max=float(values[-1]),
                             top=np.float32(top), overflow_at_tie=overflow_at_tie, nan=nan_code,
                             inf=int(inf_codes[0]) if inf_codes.size else None, n=finite)
    return _TABLES[name]


def _decode(bb, x, name: str):
    dims = static_shape(x)
    codes = emit(bb, relax.op.memory.view(x, dims, "uint8"))
    table = const(_table(name)["decoded"], "float32")
    return emit(bb, relax.op.take(table, cast(bb, codes, "int32"), axis=0))


def _encode(bb, xf, name: str, saturate: bool):
    """float32 tensor -> float8 tensor `name` (through uint8 codes)."""
    t = _table(name)
    dims = static_shape(xf)
    f32 = "float32"
    # NaN from the bits: the host pipeline compiles with fast-math, where x != x is folded to false
    bits = relax.op.bitwise_and(relax.op.memory.view(xf, dims, "int32"), const(np.int32(0x7FFFFFFF), "int32"))
    is_nan = emit(bb, relax.op.greater(bits, const(np.int32(0x7F800000), "int32")))
    neg = emit(bb, relax.op.less(xf, const(0.0, f32)))
    ax = emit(bb, relax.op.abs(xf))
    if saturate:
        ax = emit(bb, relax.op.where(relax.op.greater(ax, const(t["max"], f32)), const(t["max"], f32), ax))
    mids = const(t["mids"], f32)
    ax1 = emit(bb, relax.op.expand_dims(ax, -1))
    idx = emit(bb, relax.op.sum(relax.op.astype(relax.op.less(mids, ax1), "int32"), axis=[-1]))
    # a tie (|x| exactly on the midpoint above the chosen code) goes to the even code
    mids_ext = const(np.append(t["mids"], np.float32(np.inf)), f32)
    tie = relax.op.equal(relax.op.take(mids_ext, idx, axis=0), ax)
    odd = relax.op.equal(relax.op.bitwise_and(idx, const(np.int32(1), "int32")), const(np.int32(1), "int32"))
    idx = emit(bb, relax.op.where(relax.op.logical_and(tie, odd), relax.op.add(idx, const(np.int32(1), "int32")), idx))
    code = idx
    if not saturate:
        over = (relax.op.greater_equal if t["overflow_at_tie"] else relax.op.greater)(ax, const(t["top"], f32))
        special = t["inf"] if t["inf"] is not None else t["nan"]
        code = emit(bb, relax.op.where(over, const(np.int32(special), "int32"), code))
    signed = relax.op.logical_and(neg, relax.op.not_equal(code, const(np.int32(0), "int32")))
    if t["inf"] is None and not saturate:  # NaN codes carry no sign here
        signed = relax.op.logical_and(signed, relax.op.not_equal(code, const(np.int32(t["nan"]), "int32")))
    code = emit(bb, relax.op.where(signed, relax.op.bitwise_or(code, const(np.int32(128), "int32")), code))
    code = emit(bb, relax.op.where(is_nan, const(np.int32(t["nan"]), "int32"), code))
    return emit(bb, relax.op.memory.view(cast(bb, code, "uint8"), dims, name))


def _encode_e8m0(bb, x, saturate: bool, round_mode: str):
    """float -> float8_e8m0fnu (a bare power-of-two exponent): the float32 exponent field, rounded up, down or
    to nearest from the mantissa bits exactly as onnx.numpy_helper.to_float8e8m0; inf/NaN -> 0xFF."""
    i32 = "int32"
    xf = cast(bb, x, "float32")
    dims = static_shape(xf)
    k = lambda v: const(np.int32(v), i32)  # noqa: E731
    bits = emit(bb, relax.op.memory.view(xf, dims, i32))
    exponent = emit(bb, relax.op.bitwise_and(relax.op.right_shift(bits, k(23)), k(0xFF)))
    special = emit(bb, relax.op.equal(exponent, k(0xFF)))
    nonzero = lambda mask: relax.op.not_equal(relax.op.bitwise_and(bits, k(mask)), k(0))  # noqa: E731
    if round_mode == "up":
        up = nonzero(0x7FFFFF)
    elif round_mode == "nearest":
        lsb = relax.op.greater(exponent, k(0))
        up = relax.op.logical_and(nonzero(0x400000),
                                  relax.op.logical_or(relax.op.logical_or(nonzero(0x200000), nonzero(0x1FFFFF)), lsb))
    elif round_mode == "down":
        up = None
    else:
        raise ValueError(f"Cast: unsupported round_mode '{round_mode}'")
    if up is not None:
        up = relax.op.logical_and(up, relax.op.logical_not(special))
        if saturate:
            up = relax.op.logical_and(up, relax.op.not_equal(exponent, k(0xFE)))
        exponent = emit(bb, relax.op.add(exponent, relax.op.astype(up, i32)))
    code = emit(bb, relax.op.where(special, k(0xFF), exponent))
    return emit(bb, relax.op.memory.view(cast(bb, code, "uint8"), dims, "float8_e8m0fnu"))


def cast_float8(bb, x, to: str, saturate: bool):
    src = dtype_of(x)
    if src not in _F8.values() and to not in _F8.values():
        return NotImplemented
    if static_shape(x) is None:
        return NotImplemented
    xf = _decode(bb, x, src) if src in _F8.values() else cast(bb, x, "float32")
    if to in _F8.values():
        return _encode(bb, xf, to, saturate)
    return cast(bb, xf, to)


@register("Cast")
def cast_op(bb, inputs, attrs, params, opset):
    code = int(attrs["to"])
    if code == 24 and static_shape(inputs[0]) is not None:  # FLOAT8E8M0
        mode = attrs.get("round_mode", b"up")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        return _encode_e8m0(bb, inputs[0], bool(int(attrs.get("saturate", 1))), mode)
    to = _F8.get(code)
    if to is None:
        if dtype_of(inputs[0]) not in _F8.values():
            return NotImplemented
        to = onnx_dtype(code)
    return cast_float8(bb, inputs[0], to, bool(int(attrs.get("saturate", 1))))


@register("CastLike")
def cast_like(bb, inputs, attrs, params, opset):
    if not hasattr(inputs[1], "ty") or not hasattr(inputs[1].ty, "dtype"):
        return NotImplemented
    return cast_float8(bb, inputs[0], dtype_of(inputs[1]), bool(int(attrs.get("saturate", 1))))
