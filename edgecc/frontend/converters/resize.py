"""`Resize` (and `Upsample`) as per-axis gathers with weights computed at import time from the ONNX reference.

Resize is separable: the output is the input resized along one axis after another, and along one axis each
output position is a weighted sum of a few input positions (1 for nearest, 2 for linear, 4 for cubic, more
for antialiased downsampling), or the extrapolation value (tf_crop_and_resize outside the ROI). With a
static shape and constant scales/sizes those taps and weights are constants, so edgecc asks the ONNX
reference's own 1-D kernel (`_interpolate_1d_along_axis`, applied to an identity matrix) for them: every
mode, coordinate transformation, antialias, exclude_outside, cubic_coeff_a, axes and keep_aspect_ratio_policy
then matches the spec by construction. In the graph an axis becomes `take` of each tap times its weight,
summed (a single `take` for nearest). TVM's converter handles only 4-D/5-D inputs without axes, antialias,
half_pixel_symmetric or keep_aspect_ratio_policy, and rounds linear downsampling differently.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import const, dtype_of, emit, present, static_shape
from edgecc.frontend.converters.standard import const_value

_FLOAT = ("float16", "float32", "float64")


def _text(attrs, name: str, default: str) -> str:
    v = attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _coeff_fn(mode: str, antialias: bool, cubic_a: float, nearest_mode: str):
    from onnx.reference.ops import op_resize as ref

    if mode == "nearest":
        return lambda x, scale: ref._nearest_coeffs(x, mode=nearest_mode)
    if mode == "cubic":
        fn = ref._cubic_coeffs_antialias if antialias else ref._cubic_coeffs
        return lambda x, scale: fn(x, scale, A=cubic_a)
    if mode == "linear":
        return ref._linear_coeffs_antialias if antialias else ref._linear_coeffs
    raise ValueError(f"Resize mode '{mode}' is not supported")


def _plan(shape: list[int], scales, sizes, axes, roi, policy: str):
    """(output size, scale, roi pair) per resized axis, as the reference's `_interpolate_nd` computes them."""
    r = len(shape)
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    n = len(axes)
    in_sizes = [shape[a] for a in axes]
    if roi is not None and roi.size == 0:
        roi = None
    if sizes is not None:
        out = [int(s) for s in sizes]
        factors = [o / i for o, i in zip(out, in_sizes)]
        if policy != "stretch":
            scale = min(factors) if policy == "not_larger" else max(factors)
            if policy not in ("not_larger", "not_smaller"):
                raise ValueError(f"Resize keep_aspect_ratio_policy '{policy}' is not supported")
            factors = [scale] * n
            out = [int(scale * i + 0.5) for i in in_sizes]
    else:
        factors = [float(s) for s in scales]
        out = [int(f * i) for f, i in zip(factors, in_sizes)]
    rois = [None] * n if roi is None else [(float(roi[i]), float(roi[i + n])) for i in range(n)]
    return [(a, o, f, q) for a, o, f, q in zip(axes, out, factors, rois)]


def _axis_taps(in_w: int, out_w: int, scale: float, roi, coeffs, extrapolation: float, ctm: str, exclude: bool):
    """(indices [out, k], weights [out, k], extrapolated [out] bool) of one axis, from the reference."""
    from onnx.reference.ops import op_resize as ref

    kw = dict(roi=roi, coordinate_transformation_mode=ctm, exclude_outside=exclude)
    w = ref._interpolate_1d_along_axis(np.eye(in_w), 0, scale, out_w, coeffs, extrapolation_value=0.0, **kw)
    extra = ref._interpolate_1d_along_axis(np.zeros((in_w, 1)), 0, scale, out_w, coeffs, extrapolation_value=1.0,
                                           **kw)[:, 0] != 0
    k = max(1, int((w != 0).sum(axis=1).max()) if out_w else 1)
    idx = np.zeros((out_w, k), dtype=np.int64)
    wt = np.zeros((out_w, k), dtype=np.float64)
    for o in range(out_w):
        nz = np.flatnonzero(w[o])
        idx[o, : nz.size], wt[o, : nz.size] = nz, w[o, nz]
    return idx, wt, extra


def _resize_axis(bb, x, axis: int, rank: int, idx, wt, extra, extrapolation: float, dt: str):
    bshape = [1] * rank
    bshape[axis] = idx.shape[0]
    if np.all(wt[:, 0] == 1) and np.all(wt[:, 1:] == 0):  # nearest: one tap of weight 1
        y = emit(bb, relax.op.take(x, const(idx[:, 0], "int64"), axis=axis))
    else:
        y = None
        for j in range(idx.shape[1]):
            term = relax.op.multiply(relax.op.take(x, const(idx[:, j], "int64"), axis=axis),
                                     const(wt[:, j].reshape(bshape).astype(dt), dt))
            y = emit(bb, term if y is None else relax.op.add(y, term))
    if extra.any():
        y = emit(bb, relax.op.where(const(extra.reshape(bshape), "bool"), const(np.asarray(extrapolation, dt), dt), y))
    return y


def _resize(bb, x, scales, sizes, roi, attrs, default_ctm: str):
    shape = static_shape(x)
    dt = dtype_of(x)
    if shape is None or dt not in _FLOAT:
        return NotImplemented
    try:
        from onnx.reference.ops import op_resize as ref

        ref._interpolate_1d_along_axis  # noqa: B018 - onnx >= 1.20 has the vectorized per-axis kernel
    except (ImportError, AttributeError):
        return NotImplemented
    mode = _text(attrs, "mode", "nearest")
    ctm = _text(attrs, "coordinate_transformation_mode", default_ctm)
    antialias = bool(int(attrs.get("antialias", 0)))
    coeffs = _coeff_fn(mode, antialias, float(attrs.get("cubic_coeff_a", -0.75)),
                       _text(attrs, "nearest_mode", "round_prefer_floor"))
    extrapolation = float(attrs.get("extrapolation_value", 0.0))
    axes = attrs.get("axes")
    plan = _plan(shape, scales, sizes, list(axes) if axes is not None else None, roi,
                 _text(attrs, "keep_aspect_ratio_policy", "stretch"))
    y = x
    for axis, out_w, scale, axis_roi in plan:
        in_w = shape[axis]
        if math.isclose(scale, 1.0) and out_w == in_w and (axis_roi is None or (
                math.isclose(axis_roi[0], 0.0) and math.isclose(axis_roi[1], 1.0))):
            continue  # identity along this axis, as in the reference
        idx, wt, extra = _axis_taps(in_w, out_w, scale, list(axis_roi) if axis_roi else None, coeffs,
                                    extrapolation, ctm, bool(int(attrs.get("exclude_outside", 0))))
        y = _resize_axis(bb, y, axis, len(shape), idx, wt, extra, extrapolation, dt)
    return y


def _array(expr, params):
    if expr is None:
        return None
    v = const_value(expr, params)
    if v is None:
        raise LookupError
    v = np.asarray(v)
    return v if v.size else None


@register("Resize")
def resize(bb, inputs, attrs, params, opset):
    try:
        if opset < 11:  # X, scales; asymmetric coordinates
            return _resize(bb, inputs[0], _array(inputs[1], params), None, None, attrs, "asymmetric")
        roi = _array(inputs[1], params) if present(inputs, 1) else None
        scales = _array(inputs[2], params) if present(inputs, 2) else None
        sizes = _array(inputs[3], params) if present(inputs, 3) else None
    except LookupError:  # scales/sizes/roi computed at run time: TVM's converter
        return NotImplemented
    if scales is None and sizes is None:
        return NotImplemented
    return _resize(bb, inputs[0], scales, sizes, roi, attrs, "half_pixel")


@register("Upsample")
def upsample(bb, inputs, attrs, params, opset):
    """Upsample (opset 7: `scales` attribute; 9: input) = Resize with asymmetric coordinates."""
    if "scales" in attrs:
        scales = np.asarray(attrs["scales"], dtype=np.float64)
    else:
        try:
            scales = _array(inputs[1], params) if present(inputs, 1) else None
        except LookupError:
            return NotImplemented
    if scales is None:
        return NotImplemented
    mode = _text(attrs, "mode", "nearest")
    fixed = dict(attrs, mode=mode, nearest_mode="floor")
    return _resize(bb, inputs[0], scales, None, None, fixed, "asymmetric")
