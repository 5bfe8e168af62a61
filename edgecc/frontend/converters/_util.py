"""Small helpers shared by edgecc's converters."""

from __future__ import annotations

import numpy as np
from tvm import relax


def dtype_of(expr) -> str:
    dt = expr.ty.dtype
    return str(getattr(dt, "dtype", dt))


def static_shape(expr) -> list[int] | None:
    """The expression's shape as ints, or None when its rank or a dim is not static."""
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for v in shape.values:
        if not hasattr(v, "value"):
            return None
        out.append(int(v.value))
    return out


def const(value, dtype: str):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def cast(bb, expr, dtype: str):
    return expr if dtype_of(expr) == dtype else bb.normalize(relax.op.astype(expr, dtype))


def emit(bb, expr):
    return bb.normalize(expr)


def present(inputs, i: int) -> bool:
    return len(inputs) > i and inputs[i] is not None


def num_outputs(attrs) -> int:
    return int(attrs.get("tvm_custom", {}).get("num_outputs", 1))
