"""Default-domain ops TVM 0.27's importer gets wrong.

* `Shape` of a statically shaped tensor becomes an int64 constant tensor. TVM returns a `ShapeExpr`, which
  only a dozen converters accept ("Node cannot handle ShapeExpr inputs" for Not, Sub, Size, ... — every
  `*_expanded` LayerNormalization / RMSNormalization / Attention case); edgecc builds static shapes anyway.
* `Constant` with `value_float(s)` / `value_int(s)` (TVM reads only `value`).
* `LayerNormalization` with its optional `Mean` / `InvStdDev` outputs (TVM returns a scalar for them);
  with one output TVM's converter is kept.
* `RMSNormalization` (opset 23) for any `axis` (TVM's fails to build unless axis is the last one).
* Ops TVM 0.27 lacks: `NegativeLogLikelihoodLoss`, `SoftmaxCrossEntropyLoss`, `Swish`, `SwiGLU`, `Celu`,
  `LpNormalization`, `CumProd`, `ReverseSequence`, `BitCast`, `CenterCropPad`, `TensorScatter`,
  `CausalConvWithState`, `DFT` (cos/sin matrix products), `RNN` / `GRU` / `LSTM` (unrolled over the static
  sequence, default activations), `Col2Im` (one scatter-add), `STFT` (framing + cos/sin products),
  `HannWindow` / `HammingWindow` / `BlackmanWindow` and `MelWeightMatrix` of constant inputs (constants);
  `Scan` / `Loop` are unrolled by the importer itself.
* Ops TVM gets wrong in some cases: `EyeLike` with a dtype, `OneHot` (constant depth of another dtype,
  negative indices), `Dropout`'s mask output (TVM returns a float mask), `Pow` with mixed dtypes, `Elu` in
  half precision, `ReduceMax` / `ReduceMin` on bool, on all-infinite rows and on empty sets, `IsInf`'s
  detect flags, float `Mod` with fmod=0, `BitShift` by out-of-range amounts, `SpaceToDepth` CRD, `Split`
  with zero sizes, `ConvTranspose` with `output_shape`, `MaxPool`'s Indices output, `BatchNormalization`
  in training mode.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, const, dtype_of, emit, num_outputs, present, static_shape


@register("Shape")
def shape(bb, inputs, attrs, params, opset):
    dims = static_shape(inputs[0])
    if dims is None:
        return NotImplemented
    rank = len(dims)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = rank if end is None else int(end)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return const(np.array(dims[start:end], dtype=np.int64), "int64")


@register("Constant")
def constant(bb, inputs, attrs, params, opset):
    if "value_float" in attrs:
        return const(np.float32(attrs["value_float"]), "float32")
    if "value_floats" in attrs:
        return const(np.array(attrs["value_floats"], dtype=np.float32), "float32")
    if "value_int" in attrs:
        return const(np.int64(attrs["value_int"]), "int64")
    if "value_ints" in attrs:
        return const(np.array(attrs["value_ints"], dtype=np.int64), "int64")
    return NotImplemented


def _norm_axes(x, axis: int) -> list[int]:
    rank = len(static_shape(x) or []) or x.ty.ndim
    axis = axis + rank if axis < 0 else axis
    return list(range(axis, rank))


def _stash(bb, x, attrs):
    """Inputs are normalised in float32 when stash_type=1 (the default)."""
    return cast(bb, x, "float32") if int(attrs.get("stash_type", 1)) == 1 else x


@register("LayerNormalization")
def layer_norm(bb, inputs, attrs, params, opset):
    if num_outputs(attrs) == 1:
        return NotImplemented
    x, scale = inputs[0], inputs[1]
    out_dtype = dtype_of(x)
    axes = _norm_axes(x, int(attrs.get("axis", -1)))
    eps = float(attrs.get("epsilon", 1e-5))
    xs = _stash(bb, x, attrs)
    sdt = dtype_of(xs)
    mean = emit(bb, relax.op.mean(xs, axes, keepdims=True))
    diff = emit(bb, relax.op.subtract(xs, mean))
    var = emit(bb, relax.op.mean(relax.op.multiply(diff, diff), axes, keepdims=True))
    inv = emit(bb, relax.op.rsqrt(relax.op.add(var, const(eps, sdt))))
    y = cast(bb, emit(bb, relax.op.multiply(diff, inv)), out_dtype)
    y = relax.op.multiply(y, scale)
    if present(inputs, 2):
        y = relax.op.add(y, inputs[2])
    return relax.Tuple([emit(bb, y), mean, inv])


def rms_norm(bb, x, scale, axes, eps, attrs):
    out_dtype = dtype_of(x)
    xs = _stash(bb, x, attrs)
    sdt = dtype_of(xs)
    ms = emit(bb, relax.op.mean(relax.op.multiply(xs, xs), axes, keepdims=True))
    inv = emit(bb, relax.op.rsqrt(relax.op.add(ms, const(eps, sdt))))
    y = cast(bb, emit(bb, relax.op.multiply(xs, inv)), out_dtype)
    return emit(bb, relax.op.multiply(y, scale)), inv


@register("RMSNormalization")
def rms_normalization(bb, inputs, attrs, params, opset):
    axes = _norm_axes(inputs[0], int(attrs.get("axis", -1)))
    y, _ = rms_norm(bb, inputs[0], inputs[1], axes, float(attrs.get("epsilon", 1e-5)), attrs)
    return y


def _nll(bb, logp, target, weight, attrs):
    """-logp[n, target[n, ...], ...], weighted, with ignore_index, reduced (the ONNX loss ops' shared tail)."""
    dt = dtype_of(logp)
    classes = static_shape(logp)[1]
    reduction = attrs.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    ignore = attrs.get("ignore_index")
    t = cast(bb, target, "int64")
    valid = None
    if ignore is not None:
        valid = emit(bb, relax.op.not_equal(t, const(np.int64(ignore), "int64")))
        t = emit(bb, relax.op.where(valid, t, const(np.int64(0), "int64")))
    t = emit(bb, relax.op.clip(t, 0, classes - 1))
    picked = emit(bb, relax.op.gather_elements(logp, relax.op.expand_dims(t, 1), axis=1))
    loss = emit(bb, relax.op.negative(relax.op.squeeze(picked, [1])))
    w = None
    if weight is not None:
        w = emit(bb, relax.op.take(cast(bb, weight, dt), t, axis=0))
    if valid is not None:
        v = cast(bb, valid, dt)
        w = v if w is None else emit(bb, relax.op.multiply(w, v))
    if w is not None:
        loss = emit(bb, relax.op.multiply(loss, w))
    if reduction == "none":
        return loss
    total = emit(bb, relax.op.sum(loss))
    if reduction == "sum":
        return total
    if w is None:
        return emit(bb, relax.op.mean(loss))
    return emit(bb, relax.op.divide(total, relax.op.sum(w)))


@register("NegativeLogLikelihoodLoss")
def negative_log_likelihood_loss(bb, inputs, attrs, params, opset):
    return _nll(bb, inputs[0], inputs[1], inputs[2] if present(inputs, 2) else None, attrs)


@register("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy_loss(bb, inputs, attrs, params, opset):
    logp = emit(bb, relax.op.nn.log_softmax(inputs[0], axis=1))
    loss = _nll(bb, logp, inputs[1], inputs[2] if present(inputs, 2) else None, attrs)
    return loss if num_outputs(attrs) == 1 else relax.Tuple([loss, logp])


_ONNX_DTYPE = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


def onnx_dtype(code: int) -> str:
    if int(code) not in _ONNX_DTYPE:
        raise ValueError(f"ONNX data type {code} is not supported here")
    return _ONNX_DTYPE[int(code)]


def _typed_const(value: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return relax.op.astype(const(value, "float32"), "bfloat16")
    return const(value, dtype)


@register("EyeLike")
def eye_like(bb, inputs, attrs, params, opset):
    dims = static_shape(inputs[0])
    if dims is None or len(dims) != 2:
        return NotImplemented
    dt = onnx_dtype(attrs["dtype"]) if "dtype" in attrs else dtype_of(inputs[0])
    eye = np.eye(dims[0], dims[1], k=int(attrs.get("k", 0)), dtype=np.float32 if dt == "bfloat16" else dt)
    return _typed_const(eye, dt)


# ------------------------------------------------------------------ activations and small math ops


def _f32(bb, x):
    """(x in float32, the dtype to cast back to): half types are computed in float32."""
    dt = dtype_of(x)
    return (cast(bb, x, "float32"), dt) if dt in ("float16", "bfloat16") else (x, dt)


@register("Swish")
def swish(bb, inputs, attrs, params, opset):
    x, dt = _f32(bb, inputs[0])
    alpha = float(attrs.get("alpha", 1.0))
    y = relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(x, const(alpha, dtype_of(x)))))
    return cast(bb, emit(bb, y), dt)


@register("SwiGLU")
def swiglu(bb, inputs, attrs, params, opset):
    a, dt = _f32(bb, inputs[0])
    b = cast(bb, inputs[1], dtype_of(a))
    alpha = float(attrs.get("alpha", 1.0))
    y = relax.op.multiply(relax.op.multiply(a, relax.op.sigmoid(relax.op.multiply(a, const(alpha, dtype_of(a))))), b)
    return cast(bb, emit(bb, y), dt)


def _elu_like(bb, x, alpha: float, inner_scale: float):
    """max(0, x) + min(0, alpha * (exp(x * inner_scale) - 1))."""
    xf, dt = _f32(bb, x)
    fdt = dtype_of(xf)
    neg = relax.op.multiply(const(alpha, fdt),
                            relax.op.subtract(relax.op.exp(relax.op.multiply(xf, const(inner_scale, fdt))),
                                              const(1.0, fdt)))
    y = relax.op.add(relax.op.maximum(xf, const(0.0, fdt)), relax.op.minimum(neg, const(0.0, fdt)))
    return cast(bb, emit(bb, y), dt)


@register("Celu")
def celu(bb, inputs, attrs, params, opset):
    alpha = float(attrs.get("alpha", 1.0))
    return _elu_like(bb, inputs[0], alpha, 1.0 / alpha)


@register("Elu")
def elu(bb, inputs, attrs, params, opset):
    if dtype_of(inputs[0]) not in ("float16", "bfloat16"):
        return NotImplemented  # TVM's is right for float32/64
    return _elu_like(bb, inputs[0], float(attrs.get("alpha", 1.0)), 1.0)


@register("LpNormalization")
def lp_normalization(bb, inputs, attrs, params, opset):
    x, dt = _f32(bb, inputs[0])
    fdt = dtype_of(x)
    axis, p = int(attrs.get("axis", -1)), int(attrs.get("p", 2))
    if p == 1:
        norm = relax.op.sum(relax.op.abs(x), axis=[axis], keepdims=True)
    elif p == 2:
        norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis=[axis], keepdims=True))
    else:
        raise ValueError(f"LpNormalization with p={p} (only 1 and 2 are defined)")
    norm = emit(bb, norm)
    is_zero = relax.op.equal(norm, const(0.0, fdt))
    y = relax.op.where(is_zero, const(0.0, fdt), relax.op.divide(x, relax.op.where(is_zero, const(1.0, fdt), norm)))
    return cast(bb, emit(bb, y), dt)


@register("Pow")
def power(bb, inputs, attrs, params, opset):
    x, y = inputs[0], inputs[1]
    xdt, ydt = dtype_of(x), dtype_of(y)
    if xdt == ydt and xdt.startswith("float"):
        return NotImplemented
    if xdt.startswith(("float", "bfloat")):
        return emit(bb, relax.op.power(x, cast(bb, y, xdt)))
    out = relax.op.power(cast(bb, x, "float64"), cast(bb, y, "float64"))
    return cast(bb, emit(bb, out), xdt)


def const_value(expr, params=None):
    """The numpy value of a constant input (a relax constant, or an initializer in `params`), else None."""
    value = getattr(expr, "value", None)
    if hasattr(value, "numpy"):
        return value.numpy()
    if params is not None and isinstance(expr, relax.Var) and expr.name in params[1]:
        return params[1][expr.name][1].numpy()
    return None


@register("Dropout")
def dropout(bb, inputs, attrs, params, opset):
    """Inference Dropout: identity, and an all-True mask (TVM returns a float mask)."""
    training = const_value(inputs[2], params) if present(inputs, 2) else np.array(False)
    ratio = const_value(inputs[1], params) if present(inputs, 1) else np.array(0.5)
    if training is None or (bool(training) and (ratio is None or float(ratio) != 0.0)):
        return NotImplemented  # random masks: TVM's converter
    x = inputs[0]
    if num_outputs(attrs) == 1:
        return x
    dims = static_shape(x)
    if dims is None:
        return NotImplemented
    return relax.Tuple([x, const(np.ones(dims, dtype=bool), "bool")])


@register("CumProd")
def cum_prod(bb, inputs, attrs, params, opset):
    axis_v = const_value(inputs[1], params)
    if axis_v is None:
        raise ValueError("CumProd needs a constant axis")
    x = inputs[0]
    rank = len(static_shape(x) or []) or x.ty.ndim
    axis = int(axis_v) % rank
    if int(attrs.get("reverse", 0)):
        x = emit(bb, relax.op.flip(x, axis))
    y = emit(bb, relax.op.cumprod(x, axis=axis, exclusive=bool(int(attrs.get("exclusive", 0)))))
    if int(attrs.get("reverse", 0)):
        y = emit(bb, relax.op.flip(y, axis))
    return y


@register("ReverseSequence")
def reverse_sequence(bb, inputs, attrs, params, opset):
    x, lens = inputs[0], cast(bb, inputs[1], "int64")
    dims = static_shape(x)
    if dims is None:
        return NotImplemented
    b_axis, t_axis = int(attrs.get("batch_axis", 1)), int(attrs.get("time_axis", 0))
    steps = dims[t_axis]
    t = np.arange(steps, dtype=np.int64)
    # idx[b, t] = lens[b] - 1 - t when t < lens[b], else t; laid out along (batch_axis, time_axis)
    shape_bt = [1] * len(dims)
    shape_bt[t_axis] = steps
    shape_b = [1] * len(dims)
    shape_b[b_axis] = dims[b_axis]
    tt = const(t.reshape(shape_bt), "int64")
    ll = emit(bb, relax.op.reshape(lens, shape_b))
    rev = relax.op.subtract(relax.op.subtract(ll, const(np.int64(1), "int64")), tt)
    idx = emit(bb, relax.op.where(relax.op.less(tt, ll), rev, tt))
    idx = emit(bb, relax.op.broadcast_to(idx, dims))
    return emit(bb, relax.op.gather_elements(x, idx, axis=t_axis))


@register("BitCast")
def bit_cast(bb, inputs, attrs, params, opset):
    x = inputs[0]
    to = onnx_dtype(attrs["to"])
    dims = static_shape(x)
    if dims is None:
        return NotImplemented
    return emit(bb, relax.op.memory.view(x, dims, to))


@register("CenterCropPad")
def center_crop_pad(bb, inputs, attrs, params, opset):
    x = inputs[0]
    dims = static_shape(x)
    target = const_value(inputs[1], params)
    if dims is None or target is None:
        return NotImplemented
    rank = len(dims)
    axes = [int(a) % rank for a in attrs.get("axes", range(rank))]
    for axis, want in zip(axes, target.tolist()):
        have = dims[axis]
        if want < have:  # crop: start = (have - want) // 2
            start = (have - want) // 2
            x = emit(bb, relax.op.strided_slice(x, axes=[axis], begin=[start], end=[start + want]))
        elif want > have:  # pad: before = (want - have) // 2
            before = (want - have) // 2
            width = [0] * (2 * rank)
            width[2 * axis], width[2 * axis + 1] = before, want - have - before
            x = emit(bb, relax.op.nn.pad(x, width))
        dims[axis] = want
    return x


@register("TensorScatter")
def tensor_scatter(bb, inputs, attrs, params, opset):
    """Write `update` into `past_cache` along `axis` at per-batch offsets write_indices (KV-cache update)."""
    cache, update = inputs[0], inputs[1]
    cdims, udims = static_shape(cache), static_shape(update)
    if cdims is None or udims is None:
        return NotImplemented
    rank = len(cdims)
    axis = int(attrs.get("axis", -2)) % rank
    mode = attrs.get("mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if present(inputs, 2):
        start = cast(bb, inputs[2], "int64")
    else:
        start = const(np.zeros(cdims[0], np.int64), "int64")
    bshape = [cdims[0]] + [1] * (rank - 1)
    sshape = [1] * rank
    sshape[axis] = udims[axis]
    idx = relax.op.add(relax.op.reshape(start, bshape), const(np.arange(udims[axis], dtype=np.int64).reshape(sshape),
                                                              "int64"))
    if mode == "circular":
        idx = relax.op.floor_mod(idx, const(np.int64(cdims[axis]), "int64"))
    idx = emit(bb, relax.op.broadcast_to(emit(bb, idx), udims))
    return emit(bb, relax.op.scatter_elements(cache, idx, update, axis=axis))


def _extreme_reduce(op, is_max: bool):
    """ReduceMax/ReduceMin on bool and floats. TVM starts a float max at the lowest *finite* value (min at the
    largest), so an all -inf row (a fully masked attention row) or an empty set gave -3.4e38 instead of -inf;
    the result is corrected where it equals that start value and no element does. Bool goes through int8."""

    def convert(bb, inputs, attrs, params, opset):
        x = inputs[0]
        dt = dtype_of(x)
        if dt != "bool" and dt not in ("float16", "float32", "float64"):
            return NotImplemented
        axes = attrs.get("axes")
        if axes is None and present(inputs, 1):
            axes = const_value(inputs[1], params)
            if axes is None:
                return NotImplemented
        axes = [int(a) for a in np.asarray(axes).reshape(-1)] if axes is not None else []
        if not axes and int(attrs.get("noop_with_empty_axes", 0)):
            return x
        keep = bool(int(attrs.get("keepdims", 1)))
        dims = static_shape(x)
        if dims is not None and 0 in [dims[a] for a in (axes or range(len(dims)))]:  # an empty set: the identity
            rank = len(dims)
            red = {a % rank for a in (axes or range(rank))}
            out = [1 if i in red else d for i, d in enumerate(dims) if keep or i not in red]
            value = (not is_max) if dt == "bool" else (-np.inf if is_max else np.inf)
            return const(np.full(out, value, dtype=dt), dt)
        if dt == "bool":  # int8 start values (-128 / 127) compare to 0 as an empty set must: False / True
            y = emit(bb, op(cast(bb, x, "int8"), axis=axes or None, keepdims=keep))
            return emit(bb, relax.op.greater(y, const(np.int8(0), "int8")))
        y = emit(bb, op(x, axis=axes or None, keepdims=keep))
        info = np.finfo(dt)
        start = const(info.min if is_max else info.max, dt)
        hits = relax.op.max(relax.op.astype(relax.op.equal(x, start), "int8"), axis=axes or None, keepdims=keep)
        none = relax.op.less_equal(hits, const(np.int8(0), "int8"))  # an empty max of int8 is -128
        empty = relax.op.logical_and(relax.op.equal(y, start), none)
        return emit(bb, relax.op.where(empty, const(-np.inf if is_max else np.inf, dt), y))

    return convert


register("ReduceMax")(_extreme_reduce(relax.op.max, True))
register("ReduceMin")(_extreme_reduce(relax.op.min, False))


@register("IsInf")
def is_inf(bb, inputs, attrs, params, opset):
    """IsInf with `detect_positive` / `detect_negative` (TVM's converter ignores both)."""
    x = inputs[0]
    pos, neg = int(attrs.get("detect_positive", 1)), int(attrs.get("detect_negative", 1))
    if pos and neg:
        return NotImplemented
    if not pos and not neg:
        return emit(bb, relax.op.zeros_like(x, "bool"))
    inf = const(np.inf if pos else -np.inf, dtype_of(x))
    return emit(bb, relax.op.equal(x, inf))


@register("Mod")
def mod(bb, inputs, attrs, params, opset):
    """Float Mod with fmod=0 (numpy's `mod`: the sign of the divisor), including inf and signed zeros:
    fmod, then add the divisor where the signs differ; a zero result takes the divisor's sign."""
    a, b = inputs
    dt = dtype_of(a)
    if int(attrs.get("fmod", 0)) or dt not in ("float16", "float32", "float64"):
        return NotImplemented
    work = "float32" if dt == "float16" else dt
    a, b = cast(bb, a, work), cast(bb, b, work)
    zero = const(0.0, work)
    r = emit(bb, relax.op.mod(a, b))
    differ = relax.op.logical_and(relax.op.not_equal(r, zero),
                                  relax.op.logical_xor(relax.op.less(r, zero), relax.op.less(b, zero)))
    r = emit(bb, relax.op.where(differ, relax.op.add(r, b), r))
    signed_zero = relax.op.where(relax.op.less(b, zero), const(-0.0, work), zero)
    r = emit(bb, relax.op.where(relax.op.equal(r, zero), signed_zero, r))
    return cast(bb, r, dt)


@register("OneHot")
def one_hot(bb, inputs, attrs, params, opset):
    """OneHot with constant depth and values; negative indices count from the end, out-of-range ones give
    all `off` (TVM's converter fails on a constant depth of another dtype)."""
    depth_v, values_v = const_value(inputs[1], params), const_value(inputs[2], params)
    dims = static_shape(inputs[0])
    if depth_v is None or dims is None:
        return NotImplemented
    depth = int(np.asarray(depth_v).reshape(-1)[0])
    rank = len(dims) + 1
    axis = int(attrs.get("axis", -1)) % rank
    idx = cast(bb, inputs[0], "int64")
    idx = emit(bb, relax.op.where(relax.op.less(idx, const(np.int64(0), "int64")),
                                  relax.op.add(idx, const(np.int64(depth), "int64")), idx))
    idx = emit(bb, relax.op.expand_dims(idx, axis))
    shape = [1] * rank
    shape[axis] = depth
    hot = emit(bb, relax.op.equal(idx, const(np.arange(depth, dtype=np.int64).reshape(shape), "int64")))
    dt = dtype_of(inputs[2])
    if values_v is not None and dt != "bfloat16":
        off, on = const(values_v.reshape(-1)[0], dt), const(values_v.reshape(-1)[1], dt)
    else:
        vals = inputs[2]
        off = emit(bb, relax.op.take(vals, const(np.int64(0), "int64"), axis=0))
        on = emit(bb, relax.op.take(vals, const(np.int64(1), "int64"), axis=0))
    return emit(bb, relax.op.where(hot, on, off))


@register("CausalConvWithState")
def causal_conv_with_state(bb, inputs, attrs, params, opset):
    """Depthwise causal conv1d over [past_state (or zeros), input]; outputs (y, the last k-1 steps)."""
    x, w = inputs[0], inputs[1]
    dims, wdims = static_shape(x), static_shape(w)
    if dims is None or wdims is None:
        return NotImplemented
    b, c, _ = dims
    k = wdims[2]
    dt = dtype_of(x)
    if present(inputs, 3):
        past = inputs[3]
    else:
        past = relax.op.zeros([b, c, k - 1], dt)
    padded = emit(bb, relax.op.concat([past, x], axis=2)) if k > 1 else x
    y = emit(bb, relax.op.nn.conv1d(padded, w, groups=c))
    if present(inputs, 2):
        y = emit(bb, relax.op.add(y, relax.op.reshape(inputs[2], [1, c, 1])))
    act = attrs.get("activation", b"none")
    act = act.decode() if isinstance(act, bytes) else str(act)
    if act in ("silu", "swish"):
        yf, odt = _f32(bb, y)
        y = cast(bb, emit(bb, relax.op.multiply(yf, relax.op.sigmoid(yf))), odt)
    elif act != "none":
        raise ValueError(f"CausalConvWithState activation '{act}' is not supported")
    total = static_shape(padded)[2]
    state = emit(bb, relax.op.strided_slice(padded, axes=[2], begin=[total - (k - 1)], end=[total]))
    return y if num_outputs(attrs) == 1 else relax.Tuple([y, state])


@register("DFT")
def dft(bb, inputs, attrs, params, opset):
    """DFT as matrix products with cos/sin tables (static length): forward, inverse, onesided, irfft."""
    x = inputs[0]
    dims = static_shape(x)
    if dims is None:
        return NotImplemented
    rank = len(dims)
    length = const_value(inputs[1], params) if present(inputs, 1) else None
    if present(inputs, 1) and length is None:
        return NotImplemented
    if opset >= 20:
        axis_v = const_value(inputs[2], params) if present(inputs, 2) else np.array(-2)
        if axis_v is None:
            return NotImplemented
        axis = int(np.asarray(axis_v).reshape(-1)[0])
    else:
        axis = int(attrs.get("axis", 1))
    axis %= rank
    inverse, onesided = bool(int(attrs.get("inverse", 0))), bool(int(attrs.get("onesided", 0)))
    n = dims[axis]
    if length is None:
        big = 2 * (n - 1) if inverse and onesided else n
    else:
        big = int(np.asarray(length).reshape(-1)[0])
    dt = dtype_of(x)
    cdt = "float64" if dt == "float64" else "float32"
    xc = cast(bb, x, cdt)
    comp = dims[-1]
    perm = [i for i in range(rank - 1) if i != axis] + [axis]
    back = list(np.argsort(perm))

    def part(j):
        p = emit(bb, relax.op.squeeze(relax.op.strided_slice(xc, axes=[rank - 1], begin=[j], end=[j + 1]), [rank - 1]))
        return emit(bb, relax.op.permute_dims(p, perm))  # [..., n]

    xr = part(0)
    xi = part(1) if comp == 2 else None
    if inverse and onesided:
        used = min(n, big // 2 + 1)
    else:
        used = min(n, big)
    if used < n:
        xr = emit(bb, relax.op.strided_slice(xr, axes=[rank - 2], begin=[0], end=[used]))
        xi = emit(bb, relax.op.strided_slice(xi, axes=[rank - 2], begin=[0], end=[used])) if xi is not None else None
    rows = np.arange(used).reshape(-1, 1)
    if inverse and onesided:  # irfft: Hermitian input of used bins -> big real samples
        cols = np.arange(big).reshape(1, -1)
        theta = 2 * np.pi * rows * cols / big
        w = np.full((used, 1), 2.0)
        w[0] = 1.0
        if big % 2 == 0 and used > big // 2:
            w[big // 2] = 1.0
        cos_m, sin_m = w * np.cos(theta) / big, w * np.sin(theta) / big
        real = relax.op.matmul(xr, const(cos_m, cdt))
        if xi is not None:
            real = relax.op.subtract(real, relax.op.matmul(xi, const(sin_m, cdt)))
        out = emit(bb, relax.op.expand_dims(emit(bb, real), -1))
    else:
        bins = big // 2 + 1 if (onesided and not inverse) else big
        theta = 2 * np.pi * rows * np.arange(bins).reshape(1, -1) / big
        cos_m, sin_m = np.cos(theta), np.sin(theta)
        if inverse:
            cos_m, sin_m = cos_m / big, -sin_m / big
        c, s = const(cos_m, cdt), const(sin_m, cdt)
        real = relax.op.matmul(xr, c)
        imag = relax.op.negative(relax.op.matmul(xr, s))
        if xi is not None:
            real = relax.op.add(real, relax.op.matmul(xi, s))
            imag = relax.op.add(imag, relax.op.matmul(xi, c))
        out = emit(bb, relax.op.stack([emit(bb, real), emit(bb, imag)], axis=rank - 1))
    out = emit(bb, relax.op.permute_dims(out, [int(i) for i in back] + [rank - 1]))
    return cast(bb, out, dt)


# ------------------------------------------------------------------ RNN / GRU / LSTM (unrolled)


def _rnn_common(bb, inputs, attrs, params, gates: int):
    x, w, r = inputs[0], inputs[1], inputs[2]
    acts = attrs.get("activations")
    defaults = {1: ["Tanh"], 3: ["Sigmoid", "Tanh"], 4: ["Sigmoid", "Tanh", "Tanh"]}[gates]
    if acts is not None and [a.decode() if isinstance(a, bytes) else a for a in acts] != defaults * (len(acts) //
                                                                                                    len(defaults)):
        raise ValueError(f"recurrent activations {acts} (only the defaults {defaults} are supported)")
    if "clip" in attrs:
        raise ValueError("recurrent ops with clip are not supported")
    if present(inputs, 4):
        lens = const_value(inputs[4], params)
        xdims = static_shape(x)
        seq = xdims[1] if int(attrs.get("layout", 0)) else xdims[0]
        if lens is None or not np.all(np.asarray(lens) == seq):
            raise ValueError("sequence_lens shorter than the sequence are not supported")
    if int(attrs.get("layout", 0)):
        x = emit(bb, relax.op.permute_dims(x, [1, 0, 2]))
    seq, batch, _ = static_shape(x)
    dirs, gh, _ = static_shape(w)
    hidden = gh // gates
    dt = dtype_of(x)
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    steps = [emit(bb, relax.op.squeeze(relax.op.strided_slice(x, axes=[0], begin=[t], end=[t + 1]), [0]))
             for t in range(seq)]

    def pick(t, d):  # [dirs, ...] -> [...]
        return emit(bb, relax.op.squeeze(relax.op.strided_slice(t, axes=[0], begin=[d], end=[d + 1]), [0]))

    def initial(i):
        if present(inputs, i):
            return inputs[i]
        return relax.op.zeros([dirs, batch, hidden], dt)

    return x, w, r, seq, batch, dirs, hidden, dt, direction, steps, pick, initial


def _run_directions(bb, attrs, dirs, direction, steps, cell, pick, states0):
    """cell(x_t, states, d) -> states (states[0] = H). Returns Y [seq, dirs, batch, H] and final states."""
    ys, finals = [], []
    for d in range(dirs):
        backward = direction == "reverse" or (direction == "bidirectional" and d == 1)
        order = list(range(len(steps)))[::-1] if backward else list(range(len(steps)))
        states = [pick(s, d) for s in states0]
        hs = [None] * len(steps)
        for t in order:
            states = cell(steps[t], states, d)
            hs[t] = states[0]
        ys.append(emit(bb, relax.op.stack(hs, axis=0)))  # [seq, batch, H]
        finals.append(states)
    y = emit(bb, relax.op.stack(ys, axis=1))
    finals = [emit(bb, relax.op.stack([f[i] for f in finals], axis=0)) for i in range(len(states0))]
    return y, finals


def _rnn_outputs(bb, attrs, y, finals):
    if int(attrs.get("layout", 0)):
        y = emit(bb, relax.op.permute_dims(y, [2, 0, 1, 3]))
        finals = [emit(bb, relax.op.permute_dims(f, [1, 0, 2])) for f in finals]
    outs = [y] + finals
    return relax.Tuple(outs[: num_outputs(attrs)]) if num_outputs(attrs) > 1 else y


def _linear(x, w_t):
    return relax.op.matmul(x, relax.op.permute_dims(w_t, [1, 0]))


def _bias(bb, inputs, d, gates, hidden, dt, pick):
    if not present(inputs, 3):
        return None, None
    b = pick(inputs[3], d)
    wb = emit(bb, relax.op.strided_slice(b, axes=[0], begin=[0], end=[gates * hidden]))
    rb = emit(bb, relax.op.strided_slice(b, axes=[0], begin=[gates * hidden], end=[2 * gates * hidden]))
    return wb, rb


def _add(a, b):
    return a if b is None else relax.op.add(a, b)


def _chunk(bb, x, i, hidden):
    return emit(bb, relax.op.strided_slice(x, axes=[-1], begin=[i * hidden], end=[(i + 1) * hidden]))


@register("RNN")
def rnn(bb, inputs, attrs, params, opset):
    x, w, r, seq, batch, dirs, hidden, dt, direction, steps, pick, initial = _rnn_common(bb, inputs, attrs, params, 1)

    def cell(xt, states, d):
        wb, rb = _bias(bb, inputs, d, 1, hidden, dt, pick)
        z = _add(_add(relax.op.add(_linear(xt, pick(w, d)), _linear(states[0], pick(r, d))), wb), rb)
        return [emit(bb, relax.op.tanh(z))]

    y, finals = _run_directions(bb, attrs, dirs, direction, steps, cell, pick, [initial(5)])
    return _rnn_outputs(bb, attrs, y, finals)


@register("GRU")
def gru(bb, inputs, attrs, params, opset):
    x, w, r, seq, batch, dirs, hidden, dt, direction, steps, pick, initial = _rnn_common(bb, inputs, attrs, params, 3)
    before = int(attrs.get("linear_before_reset", 0))

    def cell(xt, states, d):
        h = states[0]
        wd, rd = pick(w, d), pick(r, d)
        wb, rb = _bias(bb, inputs, d, 3, hidden, dt, pick)
        xw = emit(bb, _add(_linear(xt, wd), wb))  # [batch, 3H]: z, r, h
        hr_all = emit(bb, _linear(h, rd))
        rbs = [None] * 3 if rb is None else [_chunk(bb, rb, i, hidden) for i in range(3)]
        z = emit(bb, relax.op.sigmoid(_add(relax.op.add(_chunk(bb, xw, 0, hidden), _chunk(bb, hr_all, 0, hidden)),
                                           rbs[0])))
        rr = emit(bb, relax.op.sigmoid(_add(relax.op.add(_chunk(bb, xw, 1, hidden), _chunk(bb, hr_all, 1, hidden)),
                                            rbs[1])))
        rh = emit(bb, relax.op.strided_slice(rd, axes=[0], begin=[2 * hidden], end=[3 * hidden]))
        if before:
            hh = relax.op.multiply(rr, _add(_linear(h, rh), rbs[2]))
        else:
            hh = _add(_linear(relax.op.multiply(rr, h), rh), rbs[2])
        cand = emit(bb, relax.op.tanh(relax.op.add(_chunk(bb, xw, 2, hidden), hh)))
        one = const(np.ones((), dtype=dt), dt)
        return [emit(bb, relax.op.add(relax.op.multiply(relax.op.subtract(one, z), cand), relax.op.multiply(z, h)))]

    y, finals = _run_directions(bb, attrs, dirs, direction, steps, cell, pick, [initial(5)])
    return _rnn_outputs(bb, attrs, y, finals)


@register("LSTM")
def lstm(bb, inputs, attrs, params, opset):
    x, w, r, seq, batch, dirs, hidden, dt, direction, steps, pick, initial = _rnn_common(bb, inputs, attrs, params, 4)
    if int(attrs.get("input_forget", 0)):
        raise ValueError("LSTM with input_forget=1 is not supported")

    def cell(xt, states, d):
        h, c = states
        wb, rb = _bias(bb, inputs, d, 4, hidden, dt, pick)
        g = emit(bb, _add(_add(relax.op.add(_linear(xt, pick(w, d)), _linear(h, pick(r, d))), wb), rb))
        gi, go, gf, gc = (_chunk(bb, g, i, hidden) for i in range(4))
        if present(inputs, 7):
            p = pick(inputs[7], d)
            pi, po, pf = (_chunk(bb, p, i, hidden) for i in range(3))
            gi, gf = relax.op.add(gi, relax.op.multiply(pi, c)), relax.op.add(gf, relax.op.multiply(pf, c))
        i_t, f_t = emit(bb, relax.op.sigmoid(gi)), emit(bb, relax.op.sigmoid(gf))
        c_new = emit(bb, relax.op.add(relax.op.multiply(f_t, c), relax.op.multiply(i_t, relax.op.tanh(gc))))
        if present(inputs, 7):
            go = relax.op.add(go, relax.op.multiply(po, c_new))
        o_t = emit(bb, relax.op.sigmoid(go))
        return [emit(bb, relax.op.multiply(o_t, relax.op.tanh(c_new))), c_new]

    y, finals = _run_directions(bb, attrs, dirs, direction, steps, cell, pick, [initial(5), initial(6)])
    return _rnn_outputs(bb, attrs, y, finals)


def _unrolled_only(op: str):
    def convert(bb, inputs, attrs, params, opset):
        if op == "Scan" and opset < 9:
            raise ValueError("Scan before opset 9 (batched, with sequence_lens) is not supported")
        raise ValueError(f"{op} is supported only with a static trip count (edgecc unrolls it at import); "
                         "this one depends on run-time values")

    return convert


# The importer unrolls Scan (opset >= 9) and Loop with a constant trip count before converters are asked
# (edgecc/frontend/importer.py); registering them here makes `op_support` count them as importable.
register("Scan")(_unrolled_only("Scan"))
register("Loop")(_unrolled_only("Loop"))


def _window(kind: str):
    """HannWindow / HammingWindow / BlackmanWindow of a constant size: a constant (ONNX's formulas, in float64)."""

    def convert(bb, inputs, attrs, params, opset):
        size_v = const_value(inputs[0], params)
        if size_v is None:
            raise ValueError(f"{kind}Window needs a constant size")
        size = int(np.asarray(size_v).reshape(-1)[0])
        periodic = int(attrs.get("periodic", 1))
        n = np.arange(size, dtype=np.float64)
        denom = size if periodic else size - 1
        x = 2 * np.pi * n / denom if denom > 0 else np.zeros_like(n)
        if kind == "Hann":
            w = 0.5 - 0.5 * np.cos(x)
        elif kind == "Hamming":
            w = 25 / 46 - (21 / 46) * np.cos(x)
        else:
            w = 0.42 - 0.5 * np.cos(x) + 0.08 * np.cos(2 * x)
        dt = onnx_dtype(int(attrs.get("output_datatype", 1)))
        return const(w.astype(dt), dt)

    return convert


for _kind in ("Hann", "Hamming", "Blackman"):
    register(f"{_kind}Window")(_window(_kind))


@register("BitShift")
def bit_shift(bb, inputs, attrs, params, opset):
    """BitShift with shift amounts outside [0, bits) (opset 28 semantics, which TVM's converter leaves to the
    hardware): a left shift gives 0, a right shift 0 or, for a negative signed value, -1."""
    x, s = inputs
    dt = dtype_of(x)
    bits = np.iinfo(dt).bits
    right = _text_attr(attrs, "direction", "RIGHT") == "RIGHT"
    sd = dtype_of(s)
    valid = relax.op.less(s, const(bits, sd))
    if np.issubdtype(np.dtype(sd), np.signedinteger):
        valid = relax.op.logical_and(valid, relax.op.greater_equal(s, const(0, sd)))
    valid = emit(bb, valid)
    safe = emit(bb, relax.op.where(valid, s, const(0, sd)))
    shifted = emit(bb, (relax.op.right_shift if right else relax.op.left_shift)(x, cast(bb, safe, dt)))
    fill = const(0, dt)
    if right and np.issubdtype(np.dtype(dt), np.signedinteger):
        fill = relax.op.where(relax.op.less(x, const(0, dt)), const(-1, dt), const(0, dt))
    return emit(bb, relax.op.where(valid, shifted, fill))


def _text_attr(attrs, name: str, default: str) -> str:
    v = attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


@register("SpaceToDepth")
def space_to_depth(bb, inputs, attrs, params, opset):
    """SpaceToDepth's CRD mode (opset 28; TVM's converter knows only DCR)."""
    if _text_attr(attrs, "mode", "DCR") != "CRD":
        return NotImplemented
    x = inputs[0]
    dims = static_shape(x)
    b = int(attrs["blocksize"])
    if dims is None or len(dims) != 4:
        return NotImplemented
    n, c, hh, ww = dims
    y = relax.op.reshape(x, [n, c, hh // b, b, ww // b, b])
    y = relax.op.permute_dims(y, [0, 1, 3, 5, 2, 4])
    return emit(bb, relax.op.reshape(y, [n, c * b * b, hh // b, ww // b]))


@register("Split")
def split(bb, inputs, attrs, params, opset):
    """Split with constant sizes that include zeros (TVM's split needs strictly increasing indices)."""
    x = inputs[0]
    dims = static_shape(x)
    sizes = attrs.get("split")
    if sizes is None and present(inputs, 1):
        sizes = const_value(inputs[1], params)
    if dims is None or sizes is None:
        return NotImplemented
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    if all(sizes):
        return NotImplemented
    axis = int(attrs.get("axis", 0)) % len(dims)
    outs, start = [], 0
    for size in sizes:
        outs.append(emit(bb, relax.op.strided_slice(x, axes=[axis], begin=[start], end=[start + size])))
        start += size
    return relax.Tuple(outs)


@register("ConvTranspose")
def conv_transpose(bb, inputs, attrs, params, opset):
    """ConvTranspose with `output_shape` (TVM's converter ignores it): the pads the spec derives from it, a
    negative end pad becoming output_padding; then TVM's converter."""
    from tvm.relax.frontend.onnx.onnx_frontend import ConvTranspose

    out_shape = attrs.get("output_shape")
    x_dims, w_dims = static_shape(inputs[0]), static_shape(inputs[1])
    if out_shape is None or x_dims is None or w_dims is None:
        return NotImplemented
    n = len(x_dims) - 2
    out_shape = list(out_shape)[-n:]
    strides = list(attrs.get("strides", [1] * n))
    dil = list(attrs.get("dilations", [1] * n))
    out_pad = list(attrs.get("output_padding", [0] * n))
    kernel = list(attrs.get("kernel_shape", w_dims[2:]))
    upper = _text_attr(attrs, "auto_pad", "NOTSET") == "SAME_UPPER"
    begin, end = [], []
    for i in range(n):
        total = strides[i] * (x_dims[i + 2] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - out_shape[i]
        b, e = (total // 2, total - total // 2) if upper else (total - total // 2, total // 2)
        if b < 0:
            return NotImplemented
        if e < 0:
            out_pad[i] -= e
            e = 0
        begin.append(b)
        end.append(e)
    fixed = {k: v for k, v in attrs.items() if k not in ("output_shape", "auto_pad")}
    fixed.update(pads=begin + end, output_padding=out_pad)
    return ConvTranspose.get_converter(opset)(bb, inputs, fixed, params)


@register("Col2Im")
def col2im(bb, inputs, attrs, params, opset):
    """Col2Im with constant image and block shapes: every column element added into its (padded) image
    position with one scatter-add; the padding is then cut off."""
    x = inputs[0]
    dims = static_shape(x)
    image, block = const_value(inputs[1], params), const_value(inputs[2], params)
    if dims is None or image is None or block is None:
        return NotImplemented
    image, block = [int(v) for v in np.asarray(image).reshape(-1)], [int(v) for v in np.asarray(block).reshape(-1)]
    n = len(image)
    strides = list(attrs.get("strides", [1] * n))
    dil = list(attrs.get("dilations", [1] * n))
    pads = list(attrs.get("pads", [0] * 2 * n))
    padded = [image[i] + pads[i] + pads[i + n] for i in range(n)]
    counts = [(padded[i] - (dil[i] * (block[i] - 1) + 1)) // strides[i] + 1 for i in range(n)]
    batch, ck, length = dims
    k = int(np.prod(block))
    c = ck // k
    kk = np.stack(np.meshgrid(*[np.arange(b) for b in block], indexing="ij"), -1).reshape(-1, n)  # [K, n]
    ll = np.stack(np.meshgrid(*[np.arange(m) for m in counts], indexing="ij"), -1).reshape(-1, n)  # [L, n]
    pos = ll[None, :, :] * np.array(strides) + kk[:, None, :] * np.array(dil)  # [K, L, n] padded coordinates
    flat = np.ravel_multi_index(tuple(pos[..., i] for i in range(n)), padded).reshape(-1)  # [K*L]
    idx = const(np.broadcast_to(flat, (batch, c, flat.size)).astype(np.int64), "int64")
    dt = dtype_of(x)
    upd = emit(bb, relax.op.reshape(x, [batch, c, k * length]))
    zeros = const(np.zeros((batch, c, int(np.prod(padded))), dt), dt)
    out = emit(bb, relax.op.scatter_elements(zeros, idx, upd, axis=2, reduction="add"))
    out = emit(bb, relax.op.reshape(out, [batch, c] + padded))
    if any(pads):
        out = emit(bb, relax.op.strided_slice(out, axes=list(range(2, 2 + n)), begin=pads[:n],
                                              end=[pads[i] + image[i] for i in range(n)]))
    return out


@register("STFT")
def stft(bb, inputs, attrs, params, opset):
    """STFT with a constant frame step and length: frames gathered with constant indices, windowed, then a
    DFT as two matmuls with cos/sin tables (float64-built). Output [batch, frames, bins, 2]."""
    x = inputs[0]
    dims = static_shape(x)
    step = const_value(inputs[1], params)
    window = inputs[2] if present(inputs, 2) else None
    length = const_value(inputs[3], params) if present(inputs, 3) else None
    if length is None and window is not None and static_shape(window) is not None:
        length = static_shape(window)[0]
    if dims is None or step is None or length is None:
        return NotImplemented
    step, length = int(np.asarray(step).reshape(-1)[0]), int(np.asarray(length).reshape(-1)[0])
    batch, sig_len, comp = dims
    frames = (sig_len - length) // step + 1
    onesided = int(attrs.get("onesided", 1))
    bins = length // 2 + 1 if onesided else length
    dt = dtype_of(x)
    idx = (np.arange(frames)[:, None] * step + np.arange(length)[None, :]).reshape(-1)
    fr = emit(bb, relax.op.take(x, const(idx.astype(np.int64), "int64"), axis=1))
    fr = emit(bb, relax.op.reshape(fr, [batch, frames, length, comp]))
    if window is not None:
        fr = emit(bb, relax.op.multiply(fr, relax.op.reshape(cast(bb, window, dt), [1, 1, length, 1])))
    ang = 2 * np.pi * np.outer(np.arange(length), np.arange(bins)) / length  # [length, bins]
    cos, sin = const(np.cos(ang).astype(dt), dt), const(np.sin(ang).astype(dt), dt)

    def part(i):
        return emit(bb, relax.op.squeeze(relax.op.strided_slice(fr, axes=[3], begin=[i], end=[i + 1]), [3]))

    xr = part(0)
    re = relax.op.matmul(xr, cos)
    im = relax.op.negative(relax.op.matmul(xr, sin))
    if comp == 2:
        xi = part(1)
        re = relax.op.add(re, relax.op.matmul(xi, sin))
        im = relax.op.add(im, relax.op.matmul(xi, cos))
    return emit(bb, relax.op.stack([emit(bb, re), emit(bb, im)], axis=3))


@register("MelWeightMatrix")
def mel_weight_matrix(bb, inputs, attrs, params, opset):
    """All inputs are constants: the matrix itself, computed by onnx's reference implementation."""
    from onnx import helper
    from onnx import numpy_helper as onnx_numpy
    from onnx.reference import ReferenceEvaluator

    values = [const_value(i, params) for i in inputs]
    if any(v is None for v in values):
        raise ValueError("MelWeightMatrix needs constant inputs")
    code = int(attrs.get("output_datatype", 1))
    names = [f"in{i}" for i in range(len(values))]
    node = helper.make_node("MelWeightMatrix", names, ["w"], output_datatype=code)
    graph = helper.make_graph([node], "mel", [], [helper.make_empty_tensor_value_info("w")],
                              [onnx_numpy.from_array(np.asarray(v), n) for v, n in zip(values, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 17))])
    w = ReferenceEvaluator(model).run(None, {})[0]
    return const(np.asarray(w, dtype=onnx_dtype(code)), onnx_dtype(code))


@register("BatchNormalization")
def batch_norm_training(bb, inputs, attrs, params, opset):
    """training_mode=1 (opset 14+): normalise with the batch's own mean and (population) variance and also
    return the updated running statistics. Inference mode stays with TVM's converter."""
    if not int(attrs.get("training_mode", 0)) or opset < 14:
        return NotImplemented
    x, scale, bias, mean, var = inputs[:5]
    dims = static_shape(x)
    if dims is None:
        return NotImplemented
    dt = dtype_of(x)
    eps, momentum = float(attrs.get("epsilon", 1e-5)), float(attrs.get("momentum", 0.9))
    axes = [a for a in range(len(dims)) if a != 1]
    shape = [1, dims[1]] + [1] * (len(dims) - 2)
    b_mean = emit(bb, relax.op.mean(x, axis=axes, keepdims=True))
    b_var = emit(bb, relax.op.mean(relax.op.square(relax.op.subtract(x, b_mean)), axis=axes, keepdims=True))
    norm = relax.op.divide(relax.op.subtract(x, b_mean), relax.op.sqrt(relax.op.add(b_var, const(eps, dt))))
    y = emit(bb, relax.op.add(relax.op.multiply(norm, relax.op.reshape(scale, shape)), relax.op.reshape(bias, shape)))
    outs = [y]
    for running, batch in ((mean, b_mean), (var, b_var)):
        flat = relax.op.reshape(batch, [dims[1]])
        outs.append(emit(bb, relax.op.add(relax.op.multiply(running, const(momentum, dt)),
                                          relax.op.multiply(flat, const(1 - momentum, dt)))))
    return relax.Tuple(outs[:max(1, num_outputs(attrs))])


@register("MaxPool")
def max_pool_with_indices(bb, inputs, attrs, params, opset):
    """2-D MaxPool asked for its Indices output (TVM returns only values): every window gathered with a
    constant index table from the -inf padded input, max and argmax over it, the argmax mapped back to the
    flat NCHW (storage_order 0) or NCWH (1) index of the input."""
    if num_outputs(attrs) < 2:
        return NotImplemented
    x = inputs[0]
    dims = static_shape(x)
    if dims is None or len(dims) != 4 or _text_attr(attrs, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return NotImplemented
    n, c, hh, ww = dims
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", (1, 1))
    dh, dw = attrs.get("dilations", (1, 1))
    pt, pl, pb, pr = attrs.get("pads", (0, 0, 0, 0))
    ceil = int(attrs.get("ceil_mode", 0))

    def out_len(size, p0, p1, k, s, d):
        span = size + p0 + p1 - ((k - 1) * d + 1)
        return (-(-span // s) if ceil else span // s) + 1

    oh, ow = out_len(hh, pt, pb, kh, sh, dh), out_len(ww, pl, pr, kw, sw, dw)
    ph = max(hh + pt + pb, (oh - 1) * sh + (kh - 1) * dh + 1)
    pw = max(ww + pl + pr, (ow - 1) * sw + (kw - 1) * dw + 1)
    oy, ox, ky, kx = np.meshgrid(np.arange(oh), np.arange(ow), np.arange(kh), np.arange(kw), indexing="ij")
    py, px = (oy * sh + ky * dh).reshape(oh * ow, kh * kw), (ox * sw + kx * dw).reshape(oh * ow, kh * kw)
    iy, ix = py - pt, px - pl
    inside = (iy >= 0) & (iy < hh) & (ix >= 0) & (ix < ww)
    orig = np.where(inside, (ix * hh + iy) if int(attrs.get("storage_order", 0)) else (iy * ww + ix), 0)
    dt = dtype_of(x)
    low = -np.inf if dt.startswith(("float", "bfloat")) else int(np.iinfo(dt).min)
    padded = emit(bb, relax.op.nn.pad(x, [0, 0, 0, 0, pt, ph - hh - pt, pl, pw - ww - pl], pad_value=low))
    flat = emit(bb, relax.op.reshape(padded, [n, c, ph * pw]))
    win = emit(bb, relax.op.take(flat, const((py * pw + px).reshape(-1).astype(np.int64), "int64"), axis=2))
    win = emit(bb, relax.op.reshape(win, [n, c, oh * ow, kh * kw]))
    y = emit(bb, relax.op.reshape(relax.op.max(win, axis=[3]), [n, c, oh, ow]))
    am = cast(bb, emit(bb, relax.op.argmax(win, axis=3)), "int64")  # [n, c, oh*ow]
    pick = emit(bb, relax.op.add(am, const((np.arange(oh * ow) * kh * kw).astype(np.int64), "int64")))
    idx = emit(bb, relax.op.take(const(orig.reshape(-1).astype(np.int64), "int64"), pick, axis=0))
    base = const((np.arange(n * c) * hh * ww).reshape(n, c, 1).astype(np.int64), "int64")
    z = emit(bb, relax.op.reshape(relax.op.add(idx, base), [n, c, oh, ow]))
    return relax.Tuple([y, z])
