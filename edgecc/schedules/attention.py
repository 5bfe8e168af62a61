"""A fused decode-attention kernel that reads the KV cache in place, once.

Unfused, a decode step's attention copies the cache rows 0..pos into a compact tensor (K and V), transposes K,
then runs two matmuls and a softmax: about four passes over the cache per layer. This kernel takes the query
rows of one KV head (grouped-query attention: the G query heads sharing it), the cache buffers
`[1, kv_heads, max_context, head_dim]` and the position, and computes ``softmax(q K^T * scale) V`` over rows
``0..pos`` reading each cache row once for all G query rows. Parallel over KV heads; dot products use a
vector of partial sums across ``head_dim`` (so LLVM vectorizes them without reassociating a scalar sum), the
weighted sum of V rows is vectorized over ``head_dim``, and the exponentials are a vectorized degree-6
polynomial with a 2^n exponent built in the float's bits (relative error ~2e-7): LLVM turns `exp` into one
scalar libm call per score, which made the kernel exp-bound (180 us of 190 at 1000 positions).

Used by `edgecc.ir_passes.kv_cache` when it finds the decode attention pattern after the cache rewrite.
"""

from __future__ import annotations

from tvm import tirx

OP_PATTERN_OPAQUE = 8
SCHEDULE_NAME = "edgecc.decode_attention"


def decode_attention_kernel(kv_heads: int, group: int, head_dim: int, max_len: int, scale: float,
                            dtype: str = "float32", kv_dtype: str = "float32") -> tirx.PrimFunc:
    """out[0, h, g, :] = softmax_t(q[0, h, g, :] . K[0, h, t, :] * scale) @ V[0, h, t, :], t in [0, pos].

    `kv_dtype` "int8": cache rows are int8 codes followed by their float32 scale (see
    `edgecc.ir_passes.kv_cache`); the K scale multiplies each score, the V scale each softmax weight.
    """
    from tvm.script import tirx as T

    int8 = kv_dtype == "int8"
    row = head_dim + 4 if int8 else head_dim
    R, DQ = T.int64(row), T.int64(head_dim // 4)

    lanes = next(v for v in (16, 8, 4, 1) if head_dim % v == 0)
    chunks = head_dim // lanes
    H, G, D, M = (T.int64(v) for v in (kv_heads, group, head_dim, max_len))
    VL, ND = T.int64(lanes), T.int64(chunks)
    EV = T.int64(16)  # exp vector width; the score rows are padded to a multiple of it
    MP = T.int64((max_len + 15) // 16 * 16)
    scale_c = T.float32(scale)
    neg = T.float32(-3.0e38)

    @T.prim_func(private=True)
    def decode_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, pos: T.int64, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                     "edgecc.schedule": SCHEDULE_NAME})
        q = T.match_buffer(q_h, (T.int64(1), H, G, D), dtype)
        kc = T.match_buffer(k_h, (T.int64(1), H, M, R), kv_dtype)
        vc = T.match_buffer(v_h, (T.int64(1), H, M, R), kv_dtype)
        o = T.match_buffer(o_h, (T.int64(1), H, G, D), dtype)
        kf = T.decl_buffer((T.int64(1), H, M, R // T.int64(4)), "float32", data=kc.data)  # int8: row scales
        vf = T.decl_buffer((T.int64(1), H, M, R // T.int64(4)), "float32", data=vc.data)
        for h in T.parallel(H):
            s = T.decl_buffer((G, MP), dtype)
            mx = T.decl_buffer((G,), dtype, scope="local")
            den = T.decl_buffer((G,), dtype, scope="local")
            part = T.decl_buffer((VL,), dtype, scope="local")
            nf = T.decl_buffer((EV,), "float32", scope="local")
            pi = T.decl_buffer((EV,), "int32", scope="local")
            pf = T.decl_buffer((EV,), "float32", data=pi.data, scope="local")
            acc = T.decl_buffer((G, D), dtype)
            for gi in range(G):
                mx[gi] = neg
                den[gi] = T.float32(0)
                for dd in T.vectorized(D):
                    acc[gi, dd] = T.float32(0)
            for t in range(pos + T.int64(1)):
                for gi in range(G):
                    for ln in T.vectorized(VL):
                        part[ln] = T.float32(0)
                    for c in range(ND):
                        for ln in T.vectorized(VL):
                            part[ln] = part[ln] + q[0, h, gi, c * VL + ln] * T.Cast(dtype, kc[0, h, t, c * VL + ln])
                    s[gi, t] = T.float32(0)
                    for ln in range(VL):
                        s[gi, t] = s[gi, t] + part[ln]
                    if int8:
                        s[gi, t] = s[gi, t] * (scale_c * kf[0, h, t, DQ])
                    else:
                        s[gi, t] = s[gi, t] * scale_c
                    mx[gi] = T.max(mx[gi], s[gi, t])
            # exp over whole vectors of rows (the padding rows past `pos` are computed and never read).
            # No scalar temporaries inside vectorized loops: TVM 0.27's vectorizer broadcasts them wrongly.
            for gi in range(G):
                for tc in range((pos + T.int64(EV)) // T.int64(EV)):
                    for ln in T.vectorized(EV):
                        s[gi, tc * EV + ln] = T.max(s[gi, tc * EV + ln] - mx[gi], T.float32(-87.0))
                    for ln in T.vectorized(EV):
                        nf[ln] = T.floor(s[gi, tc * EV + ln] * T.float32(1.4426950408889634) + T.float32(0.5))
                    for ln in T.vectorized(EV):
                        s[gi, tc * EV + ln] = s[gi, tc * EV + ln] - nf[ln] * T.float32(0.6931471805599453)
                    for ln in T.vectorized(EV):
                        s[gi, tc * EV + ln] = T.float32(1.0) + s[gi, tc * EV + ln] * (
                            T.float32(1.0) + s[gi, tc * EV + ln] * (
                                T.float32(0.5) + s[gi, tc * EV + ln] * (
                                    T.float32(1.0 / 6) + s[gi, tc * EV + ln] * (
                                        T.float32(1.0 / 24) + s[gi, tc * EV + ln] * (
                                            T.float32(1.0 / 120) + s[gi, tc * EV + ln] * T.float32(1.0 / 720))))))
                    for ln in T.vectorized(EV):
                        pi[ln] = T.shift_left(T.Cast("int32", nf[ln]) + T.int32(127), T.int32(23))
                    for ln in T.vectorized(EV):
                        s[gi, tc * EV + ln] = s[gi, tc * EV + ln] * pf[ln]  # pf: pi's bits as float = 2^n
            for t in range(pos + T.int64(1)):
                for gi in range(G):
                    den[gi] = den[gi] + s[gi, t]
                    if int8:
                        s[gi, t] = s[gi, t] * vf[0, h, t, DQ]
                    for dd in T.vectorized(D):
                        acc[gi, dd] = acc[gi, dd] + s[gi, t] * T.Cast(dtype, vc[0, h, t, dd])
            for gi in range(G):
                for dd in T.vectorized(D):
                    o[0, h, gi, dd] = acc[gi, dd] / den[gi]

    return decode_attention
