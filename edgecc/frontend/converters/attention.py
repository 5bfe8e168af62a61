"""Attention-family ops: the standard `Attention` (opset 23/24/25), `RotaryEmbedding` (opset 23 and
com.microsoft), and the com.microsoft `MultiHeadAttention` / `GroupQueryAttention` that onnxruntime's
model builder emits.

TVM 0.27 reads every `Attention` node as the com.microsoft one (KeyError 'num_heads' on the standard op) and
has no RotaryEmbedding, MultiHeadAttention or GroupQueryAttention. All shapes must be static (edgecc builds
for a fixed signature); masks that depend only on shapes (causal, sliding window) become constants.

Semantics follow onnx's reference implementation (onnx/reference/ops/op_attention.py): Q and K are each
scaled by sqrt(scale); softcap before the additive bias; a row whose bias is all -inf gives zeros (no NaN);
`qk_matmul_output_mode` 0/1 = scores after softcap, 2 = plus bias, 3 = after softmax.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from edgecc.frontend.converters import register
from edgecc.frontend.converters._util import cast, dtype_of, emit, num_outputs, present, static_shape

_NATIVE = ("float32", "float64", "float16")


def _cst(value, dtype: str):
    """A constant of `dtype` (bfloat16 and other non-numpy types go through float32)."""
    if dtype in _NATIVE or dtype.startswith(("int", "uint", "bool")):
        return relax.const(np.asarray(value, dtype=dtype), dtype)
    return relax.op.astype(relax.const(np.asarray(value, dtype="float32"), "float32"), dtype)


def _shape(expr, what: str) -> list[int]:
    dims = static_shape(expr)
    if dims is None:
        raise ValueError(f"{what} needs a static shape")
    return dims


def _heads_first(bb, x, heads: int):
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, hidden = _shape(x, "attention input")
    x = emit(bb, relax.op.reshape(x, [b, s, heads, hidden // heads]))
    return emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))


def _heads_last(bb, x):
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = _shape(x, "attention output")
    x = emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))
    return emit(bb, relax.op.reshape(x, [b, s, h * d]))


def _masked_softmax(bb, x, guard=None):
    """Softmax over the last axis that gives 0 (not NaN) for rows that are all -inf (and rows in `guard`)."""
    dt = dtype_of(x)
    neg_inf = _cst(-np.inf, dt)
    x_max = emit(bb, relax.op.max(x, axis=[-1], keepdims=True))
    all_masked = emit(bb, relax.op.equal(x_max, neg_inf))
    safe_max = emit(bb, relax.op.where(all_masked, _cst(0.0, dt), x_max))
    e = emit(bb, relax.op.exp(relax.op.subtract(x, safe_max)))
    s = emit(bb, relax.op.sum(e, axis=[-1], keepdims=True))
    s = emit(bb, relax.op.where(relax.op.equal(s, _cst(0.0, dt)), _cst(1.0, dt), s))
    p = emit(bb, relax.op.divide(e, s))
    if guard is not None:
        p = emit(bb, relax.op.where(guard, _cst(0.0, dt), p))
    return p


def _frontier(q_len: int, kv_len: int, offset, left: int = -1, right: int = -1, causal: bool = True):
    """Boolean numpy [q, kv] of allowed (query i, key j) pairs for a scalar offset."""
    i = np.arange(q_len).reshape(q_len, 1) + int(offset)
    j = np.arange(kv_len).reshape(1, kv_len)
    allowed = np.ones((q_len, kv_len), dtype=bool)
    if causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= (i - j) <= left
    if right >= 0:
        allowed &= (j - i) <= right
    return allowed


def _frontier_per_batch(bb, q_len: int, kv_len: int, nonpad, left=-1, right=-1, causal=True):
    """Boolean relax [B, 1, q, kv] for per-batch offsets nonpad[b] - q_len (external cache)."""
    off = emit(bb, relax.op.subtract(cast(bb, nonpad, "int64"), relax.const(np.int64(q_len), "int64")))
    off = emit(bb, relax.op.reshape(off, [-1, 1, 1, 1]))
    i = relax.op.add(relax.const(np.arange(q_len, dtype=np.int64).reshape(1, 1, q_len, 1), "int64"), off)
    i = emit(bb, i)
    j = relax.const(np.arange(kv_len, dtype=np.int64).reshape(1, 1, 1, kv_len), "int64")
    allowed = None

    def both(a, b):
        return b if a is None else emit(bb, relax.op.logical_and(a, b))

    if causal:
        allowed = both(allowed, emit(bb, relax.op.less_equal(j, i)))
    if left >= 0:
        allowed = both(allowed, emit(bb, relax.op.less_equal(relax.op.subtract(i, j),
                                                             relax.const(np.int64(left), "int64"))))
    if right >= 0:
        allowed = both(allowed, emit(bb, relax.op.less_equal(relax.op.subtract(j, i),
                                                             relax.const(np.int64(right), "int64"))))
    return allowed


def _bias_of_bool(bb, allowed, dt):
    if isinstance(allowed, np.ndarray):
        return relax.op.astype(relax.const(np.where(allowed, 0.0, -np.inf).astype(np.float32), "float32"), dt)
    return emit(bb, relax.op.where(allowed, _cst(0.0, dt), _cst(-np.inf, dt)))


def sdpa(bb, q, k, v, bias, scale: float, softcap: float = 0.0, softmax_dtype: str | None = None,
         bias_has_inf: bool = True):
    """softmax(q k^T * scale (+softcap) + bias) v on [B, H, S, D] tensors (K/V heads repeated for GQA).

    Returns (y, scores after softcap, scores plus bias, probabilities).
    """
    dt = dtype_of(q)
    hq, hk = _shape(q, "Q")[1], _shape(k, "K")[1]
    if hq != hk:
        if hq % hk:
            raise ValueError(f"{hq} query heads are not a multiple of {hk} key/value heads")
        k = emit(bb, relax.op.repeat(k, hq // hk, axis=1))
        v = emit(bb, relax.op.repeat(v, hq // hk, axis=1))
    root = _cst(math.sqrt(scale), dt)
    qs = emit(bb, relax.op.multiply(q, root))
    ks = emit(bb, relax.op.multiply(k, root))
    scores = emit(bb, relax.op.matmul(qs, relax.op.permute_dims(ks, [0, 1, 3, 2])))
    if softcap and softcap > 0:
        c = _cst(softcap, dt)
        scores = emit(bb, relax.op.multiply(relax.op.tanh(relax.op.divide(scores, c)), c))
    with_bias = scores if bias is None else emit(bb, relax.op.add(scores, bias))
    x = cast(bb, with_bias, softmax_dtype) if softmax_dtype else with_bias
    guard = None
    if bias is not None and bias_has_inf:
        bias_max = emit(bb, relax.op.max(cast(bb, bias, "float32"), axis=[-1], keepdims=True))
        guard = emit(bb, relax.op.equal(bias_max, relax.const(np.float32(-np.inf), "float32")))
    probs = _masked_softmax(bb, x, guard)
    probs = cast(bb, probs, dt)
    y = emit(bb, relax.op.matmul(probs, v))
    return y, scores, with_bias, probs


_ONNX_FLOAT = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}


@register("Attention")
def attention(bb, inputs, attrs, params, opset):
    q, k, v = inputs[0], inputs[1], inputs[2]
    mask = inputs[3] if present(inputs, 3) else None
    past_k = inputs[4] if present(inputs, 4) else None
    past_v = inputs[5] if present(inputs, 5) else None
    nonpad = inputs[6] if present(inputs, 6) else None
    dt = dtype_of(q)
    rank3 = len(_shape(q, "Q")) == 3
    if rank3:
        q = _heads_first(bb, q, int(attrs["q_num_heads"]))
        k = _heads_first(bb, k, int(attrs["kv_num_heads"]))
        v = _heads_first(bb, v, int(attrs["kv_num_heads"]))
    head = _shape(q, "Q")[3]
    scale = float(attrs.get("scale", 1.0 / math.sqrt(head)))
    if past_k is not None:
        k = emit(bb, relax.op.concat([past_k, k], axis=2))
    if past_v is not None:
        v = emit(bb, relax.op.concat([past_v, v], axis=2))
    q_len, kv_len = _shape(q, "Q")[2], _shape(k, "K")[2]
    past_len = _shape(past_k, "past_key")[2] if past_k is not None else 0
    causal = bool(int(attrs.get("is_causal", 0)))
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))
    windowed = left >= 0 or right >= 0

    if mask is not None:
        mshape = _shape(mask, "attn_mask")
        is_bool = dtype_of(mask) == "bool"
        pad = kv_len - mshape[-1]
        if pad > 0:
            fill = np.zeros(mshape[:-1] + [pad], dtype=bool)
            filler = relax.const(fill, "bool") if is_bool else _cst(np.full(fill.shape, -np.inf, np.float32), dt)
            mask = emit(bb, relax.op.concat([mask if is_bool else cast(bb, mask, dt), filler], axis=-1))
        mask = _bias_of_bool(bb, mask, dt) if is_bool else cast(bb, mask, dt)
        mask = emit(bb, mask)

    zeros = _cst(np.zeros((q_len, kv_len), np.float32), dt)
    bias = emit(bb, relax.op.add(zeros, mask)) if mask is not None else None
    per_batch = past_k is None and nonpad is not None
    if causal or windowed:
        base = bias if bias is not None else zeros
        if per_batch:
            allowed = _frontier_per_batch(bb, q_len, kv_len, nonpad, left, right, causal)
        else:
            allowed = _frontier(q_len, kv_len, past_len, left, right, causal)
        bias = emit(bb, relax.op.add(base, _bias_of_bool(bb, allowed, dt)))
    if nonpad is not None:
        keep = emit(bb, relax.op.less(relax.const(np.arange(kv_len, dtype=np.int64).reshape(1, 1, 1, kv_len)),
                                      relax.op.reshape(cast(bb, nonpad, "int64"), [-1, 1, 1, 1])))
        pad_bias = _bias_of_bool(bb, keep, dt)
        bias = emit(bb, relax.op.add(zeros if bias is None else bias, pad_bias))

    softcap = float(attrs.get("softcap", 0.0))
    sp = attrs.get("softmax_precision")
    softmax_dtype = _ONNX_FLOAT.get(int(sp)) if sp is not None else None
    y, scores, with_bias, probs = sdpa(bb, q, k, v, bias, scale, softcap, softmax_dtype)
    if rank3:
        y = _heads_last(bb, y)
    n = num_outputs(attrs)
    if n == 1:
        return y
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    qk = {0: scores, 1: scores, 2: with_bias, 3: probs}[mode]
    return relax.Tuple([y, k, v, cast(bb, qk, dt)][:n])


def _rope(bb, x, cos, sin, rot: int, interleaved: bool):
    """Rotate the first `rot` features of x [B, S, H, D] with cos/sin [B or 1, S, rot/2]."""
    b, s, h, d = _shape(x, "RotaryEmbedding input")
    dt = dtype_of(x)
    cos = emit(bb, relax.op.expand_dims(cast(bb, cos, dt), 2))
    sin = emit(bb, relax.op.expand_dims(cast(bb, sin, dt), 2))
    x_rot = emit(bb, relax.op.strided_slice(x, axes=[3], begin=[0], end=[rot])) if rot < d else x
    half = rot // 2
    if interleaved:
        pairs = emit(bb, relax.op.reshape(x_rot, [b, s, h, half, 2]))
        x1 = emit(bb, relax.op.squeeze(relax.op.strided_slice(pairs, axes=[4], begin=[0], end=[1]), [4]))
        x2 = emit(bb, relax.op.squeeze(relax.op.strided_slice(pairs, axes=[4], begin=[1], end=[2]), [4]))
    else:
        x1 = emit(bb, relax.op.strided_slice(x_rot, axes=[3], begin=[0], end=[half]))
        x2 = emit(bb, relax.op.strided_slice(x_rot, axes=[3], begin=[half], end=[rot]))
    real = emit(bb, relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2)))
    imag = emit(bb, relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2)))
    if interleaved:
        out = emit(bb, relax.op.stack([real, imag], axis=4))
        out = emit(bb, relax.op.reshape(out, [b, s, h, rot]))
    else:
        out = emit(bb, relax.op.concat([real, imag], axis=3))
    if rot < d:
        out = emit(bb, relax.op.concat([out, relax.op.strided_slice(x, axes=[3], begin=[rot], end=[d])], axis=3))
    return out


def _rotary(bb, x, cos_cache, sin_cache, positions, attrs, four_d_heads_first: bool):
    shape = _shape(x, "RotaryEmbedding input")
    if len(shape) == 4:  # [B, H, S, D] -> [B, S, H, D]
        x4 = emit(bb, relax.op.permute_dims(x, [0, 2, 1, 3]))
    else:
        heads = int(attrs.get("num_heads", 0))
        if not heads:
            raise ValueError("RotaryEmbedding of a 3-D input needs num_heads")
        x4 = emit(bb, relax.op.reshape(x, [shape[0], shape[1], heads, shape[2] // heads]))
    d = _shape(x4, "RotaryEmbedding input")[3]
    rot = int(attrs.get("rotary_embedding_dim", 0)) or d
    if positions is not None:
        cos = emit(bb, relax.op.take(cos_cache, positions, axis=0))
        sin = emit(bb, relax.op.take(sin_cache, positions, axis=0))
    else:
        cos, sin = cos_cache, sin_cache
    out = _rope(bb, x4, cos, sin, rot, bool(int(attrs.get("interleaved", 0))))
    if len(shape) == 4:
        return emit(bb, relax.op.permute_dims(out, [0, 2, 1, 3]))
    return emit(bb, relax.op.reshape(out, shape))


@register("RotaryEmbedding")
def rotary_embedding(bb, inputs, attrs, params, opset):
    positions = inputs[3] if present(inputs, 3) else None
    return _rotary(bb, inputs[0], inputs[1], inputs[2], positions, attrs, True)


@register("RotaryEmbedding", "com.microsoft")
def rotary_embedding_ms(bb, inputs, attrs, params, opset):
    """com.microsoft: (input, position_ids, cos_cache, sin_cache); position_ids [B, S], or [1] = an offset."""
    x, pos, cos_cache, sin_cache = inputs[0], inputs[1], inputs[2], inputs[3]
    if int(attrs.get("is_packed_batching", 0)):
        raise ValueError("RotaryEmbedding with is_packed_batching=1 is not supported")
    shape = _shape(x, "RotaryEmbedding input")
    seq = shape[2] if len(shape) == 4 else shape[1]
    pshape = _shape(pos, "position_ids")
    pos = cast(bb, pos, "int64")
    if len(pshape) == 1 or (len(pshape) == 2 and pshape == [1, 1] and seq != 1) or len(pshape) == 0:
        offset = emit(bb, relax.op.reshape(pos, [1, 1]))
        pos = emit(bb, relax.op.add(offset, relax.const(np.arange(seq, dtype=np.int64).reshape(1, seq), "int64")))
    return _rotary(bb, x, cos_cache, sin_cache, pos, attrs, True)


def _bnsh(bb, x, heads: int):
    """A [B, S, N*H] input as [B, N, S, H]; a 4-D input is taken as [B, N, S, H] already."""
    return x if len(_shape(x, "attention input")) == 4 else _heads_first(bb, x, heads)


def _key_bias(bb, q_len: int, kv_len: int, dt: str, offset=0, causal=False, window: int = -1):
    allowed = _frontier(q_len, kv_len, offset, left=window - 1 if window > 0 else -1, causal=causal)
    return _bias_of_bool(bb, allowed, dt)


@register("MultiHeadAttention", "com.microsoft")
def multi_head_attention(bb, inputs, attrs, params, opset):
    """com.microsoft MultiHeadAttention: separate Q/K/V ([B, S, D] or BNSH K/V), optional packed bias,
    key_padding_mask ([B, L] of 0/1), attention_bias, past_key/past_value, unidirectional."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    if k is None or v is None or len(_shape(k, "key")) == 5:
        raise ValueError("MultiHeadAttention with packed QKV/KV is not supported")
    heads = int(attrs["num_heads"])
    dt = dtype_of(q)
    if present(inputs, 3):  # bias [D + D + D_v], added to the 3-D projections
        dq, dk = _shape(q, "query")[-1], _shape(k, "key")[-1]
        bias = inputs[3]
        q = emit(bb, relax.op.add(q, relax.op.strided_slice(bias, axes=[0], begin=[0], end=[dq])))
        if len(_shape(k, "key")) == 3:
            k = emit(bb, relax.op.add(k, relax.op.strided_slice(bias, axes=[0], begin=[dq], end=[dq + dk])))
            v = emit(bb, relax.op.add(v, relax.op.strided_slice(bias, axes=[0], begin=[dq + dk],
                                                                end=[_shape(bias, "bias")[0]])))
    q, k, v = _bnsh(bb, q, heads), _bnsh(bb, k, heads), _bnsh(bb, v, heads)
    past_len = 0
    if present(inputs, 6):
        past_len = _shape(inputs[6], "past_key")[2]
        k = emit(bb, relax.op.concat([inputs[6], k], axis=2))
    if present(inputs, 7):
        v = emit(bb, relax.op.concat([inputs[7], v], axis=2))
    q_len, kv_len, head = _shape(q, "Q")[2], _shape(k, "K")[2], _shape(q, "Q")[3]
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(head)
    fill = float(attrs.get("mask_filter_value", -10000.0))
    bias = None
    if int(attrs.get("unidirectional", 0)):
        bias = _key_bias(bb, q_len, kv_len, dt, past_len, causal=True)
    if present(inputs, 4):
        mask = inputs[4]
        mshape = _shape(mask, "key_padding_mask")
        if len(mshape) != 2:
            raise ValueError("MultiHeadAttention key_padding_mask must be [batch, total_sequence_length]")
        keep = emit(bb, relax.op.reshape(relax.op.not_equal(mask, relax.const(np.zeros((), dtype=dtype_of(mask)))),
                                         [mshape[0], 1, 1, mshape[1]]))
        pad = emit(bb, relax.op.where(keep, _cst(0.0, dt), _cst(fill, dt)))
        bias = pad if bias is None else emit(bb, relax.op.add(bias, pad))
    if present(inputs, 5):
        ab = cast(bb, inputs[5], dt)
        bias = ab if bias is None else emit(bb, relax.op.add(bias, ab))
    y, _, _, _ = sdpa(bb, q, k, v, bias, scale, bias_has_inf=False)
    y = _heads_last(bb, y)
    n = num_outputs(attrs)
    return y if n == 1 else relax.Tuple([y, k, v][:n])


@register("GroupQueryAttention", "com.microsoft")
def group_query_attention(bb, inputs, attrs, params, opset):
    """com.microsoft GroupQueryAttention as onnxruntime's model builder emits it: Q/K/V [B, S, *], optional
    past_key/past_value [B, kv_heads, P, H] that the new keys are appended to (present = P + S; the shared
    buffer layout where past is already max length is not supported), seqlens_k [B] (= total length - 1),
    total_sequence_length, optional rotary (do_rotary with cos/sin caches), softcap, local_window_size."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    if k is None or v is None:
        raise ValueError("GroupQueryAttention with packed QKV is not supported")
    if int(attrs.get("smooth_softmax", 0)) or present(inputs, 11) or present(inputs, 12):
        raise ValueError("GroupQueryAttention with smooth_softmax / attention_bias / head_sink is not supported")
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    dt = dtype_of(q)
    q, k, v = _heads_first(bb, q, heads), _heads_first(bb, k, kv_heads), _heads_first(bb, v, kv_heads)
    b, _, s, head = _shape(q, "query")
    past = inputs[3] if present(inputs, 3) else None
    past_len = _shape(past, "past_key")[2] if past is not None else 0
    seqlens = cast(bb, inputs[5], "int64")  # [B]: total length - 1 per sequence
    total = emit(bb, relax.op.add(seqlens, relax.const(np.int64(1), "int64")))
    start = emit(bb, relax.op.subtract(total, relax.const(np.int64(s), "int64")))  # past length per batch
    if int(attrs.get("do_rotary", 0)):
        pos = emit(bb, relax.op.add(relax.op.reshape(start, [b, 1]),
                                    relax.const(np.arange(s, dtype=np.int64).reshape(1, s), "int64")))
        rot_attrs = {"interleaved": attrs.get("rotary_interleaved", 0)}
        q = emit(bb, relax.op.permute_dims(_rotary(bb, emit(bb, relax.op.permute_dims(q, [0, 2, 1, 3])),
                                                   inputs[7], inputs[8], pos, rot_attrs, True), [0, 2, 1, 3]))
        k = emit(bb, relax.op.permute_dims(_rotary(bb, emit(bb, relax.op.permute_dims(k, [0, 2, 1, 3])),
                                                   inputs[7], inputs[8], pos, rot_attrs, True), [0, 2, 1, 3]))
    if past is not None:
        k = emit(bb, relax.op.concat([past, k], axis=2))
        v = emit(bb, relax.op.concat([inputs[4], v], axis=2))
    kv_len = past_len + s
    # key j is visible to query i of batch b iff j <= start[b] + i, j < total[b] (and inside the window)
    i = relax.op.add(relax.op.reshape(start, [b, 1, 1, 1]),
                     relax.const(np.arange(s, dtype=np.int64).reshape(1, 1, s, 1), "int64"))
    i = emit(bb, i)
    j = relax.const(np.arange(kv_len, dtype=np.int64).reshape(1, 1, 1, kv_len), "int64")
    allowed = emit(bb, relax.op.logical_and(relax.op.less_equal(j, i),
                                            relax.op.less(j, relax.op.reshape(total, [b, 1, 1, 1]))))
    window = int(attrs.get("local_window_size", -1))
    if window > 0:
        allowed = emit(bb, relax.op.logical_and(allowed, relax.op.greater(
            j, relax.op.subtract(i, relax.const(np.int64(window), "int64")))))
    bias = _bias_of_bool(bb, allowed, dt)
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(head)
    y, _, _, _ = sdpa(bb, q, k, v, bias, scale, float(attrs.get("softcap", 0.0)))
    y = _heads_last(bb, y)
    n = num_outputs(attrs)
    return y if n == 1 else relax.Tuple([y, k, v][:n])


_MAX_UNROLL = 512


@register("LinearAttention")
def linear_attention(bb, inputs, attrs, params, opset):
    """LinearAttention (recurrent state [B, H_kv, d_k, d_v]; linear / gated / delta / gated_delta rules),
    unrolled over the (static) sequence length, in float32 as the reference computes it."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    past = inputs[3] if present(inputs, 3) else None
    decay = inputs[4] if present(inputs, 4) else None
    beta = inputs[5] if present(inputs, 5) else None
    hq, hkv = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
    rule = attrs.get("update_rule", b"gated_delta")
    rule = rule.decode() if isinstance(rule, bytes) else str(rule)
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if (gating and decay is None) or (delta and beta is None):
        raise ValueError(f"LinearAttention update_rule '{rule}' needs its decay/beta inputs")
    out_dt = dtype_of(q)
    b, t, _ = _shape(q, "query")
    if t > _MAX_UNROLL:
        raise ValueError(f"LinearAttention over {t} steps (edgecc unrolls at most {_MAX_UNROLL})")
    q4 = cast(bb, _heads_first(bb, q, hq), "float32")
    k4 = cast(bb, _heads_first(bb, k, hkv), "float32")
    v4 = cast(bb, _heads_first(bb, v, hkv), "float32")
    dk, dv = _shape(q4, "query")[3], _shape(v4, "value")[3]
    if gating:
        last = _shape(decay, "decay")[-1]
        decay4 = (emit(bb, relax.op.permute_dims(relax.op.reshape(decay, [b, t, hkv, 1]), [0, 2, 1, 3]))
                  if last == hkv else _heads_first(bb, decay, hkv))
        decay4 = cast(bb, decay4, "float32")
    if delta:
        last = _shape(beta, "beta")[-1]
        beta4 = cast(bb, emit(bb, relax.op.permute_dims(relax.op.reshape(beta, [b, t, last, 1]), [0, 2, 1, 3])),
                     "float32")
    state_dt = dtype_of(past) if past is not None else out_dt
    state = cast(bb, past, "float32") if past is not None else relax.op.zeros([b, hkv, dk, dv], "float32")
    state = emit(bb, state)
    scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(dk)

    def step(x, i):  # [B, H, T, D] -> [B, H, D]
        return emit(bb, relax.op.squeeze(relax.op.strided_slice(x, axes=[2], begin=[i], end=[i + 1]), [2]))

    outs = []
    for i in range(t):
        q_t, k_t, v_t = step(q4, i), step(k4, i), step(v4, i)
        if gating:
            g = emit(bb, relax.op.exp(step(decay4, i)))  # [B, H, 1 or d_k]
            state = emit(bb, relax.op.multiply(state, relax.op.expand_dims(g, -1)))
        if delta:
            retrieved = emit(bb, relax.op.sum(relax.op.multiply(state, relax.op.expand_dims(k_t, -1)), axis=[2]))
            v_t = emit(bb, relax.op.multiply(step(beta4, i), relax.op.subtract(v_t, retrieved)))
        state = emit(bb, relax.op.add(state, relax.op.multiply(relax.op.expand_dims(k_t, -1),
                                                               relax.op.expand_dims(v_t, -2))))
        read = state if hq == hkv else emit(bb, relax.op.repeat(state, hq // hkv, axis=1))
        o = relax.op.sum(relax.op.multiply(relax.op.expand_dims(q_t, -1), read), axis=[2])
        outs.append(emit(bb, relax.op.multiply(o, relax.const(np.float32(scale), "float32"))))
    y = emit(bb, relax.op.stack(outs, axis=2))  # [B, Hq, T, d_v]
    y = cast(bb, _heads_last(bb, y), out_dt)
    if num_outputs(attrs) == 1:
        return y
    return relax.Tuple([y, cast(bb, state, state_dt)])
