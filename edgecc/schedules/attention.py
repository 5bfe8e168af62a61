"""Fused attention kernels: one for decode that reads the KV cache in place, once; one for prefill/encoders.

Prefill (`prefill_attention_kernel`): ``softmax(q K^T * scale [+ mask]) V`` for a whole sequence of queries in
one kernel, flash-attention style: keys are walked in blocks with an online softmax (running max and sum per
query row, the accumulator rescaled when the max grows), so no [S, S] score matrix exists anywhere. The
query rows of a task are the G query heads sharing one KV head times a block of positions, so each block of K
and V rows is read once for all of them (grouped-query attention). K blocks are packed transposed so the
scores are vectorized along keys; the weighted sum of V rows is vectorized along head_dim. Causal masking
is arithmetic (key <= position + offset) and skips key blocks past the task's last position; an additive
mask [1 | batch, 1, 1 | S, Sk] (padding) is read as given. q/k/v/out can each be [B, H, S, D] or
[B, S, H, D] (the layout before the transposes an ONNX export adds), so those transposes disappear.

Decode (`decode_attention_kernel`):

Unfused, a decode step's attention copies the cache rows 0..pos into a compact tensor (K and V), transposes K,
then runs two matmuls and a softmax: about four passes over the cache per layer. This kernel takes the query
rows of one KV head (grouped-query attention: the G query heads sharing it), the cache buffers
`[1, kv_heads, max_context, head_dim]` and the position, and computes ``softmax(q K^T * scale) V`` over rows
``0..pos`` reading each cache row once for all G query rows. Parallel over KV heads; dot products use a
vector of partial sums across ``head_dim``, added up as a tree of vector halves (`base.lane_sum`: a loop over the
lanes compiled to 16 dependent scalar adds per score, the kernel's critical path; the tree made the kernel
1.7-1.9x faster and a SmolLM2 w4 decode step at context 1024 0.93x the time), the
weighted sum of V rows is vectorized over ``head_dim``, and the exponentials are a vectorized degree-6
polynomial with a 2^n exponent built in the float's bits (relative error ~2e-7): LLVM turns `exp` into one
scalar libm call per score, which made the kernel exp-bound (180 us of 190 at 1000 positions).

Used by `edgecc.ir_passes.kv_cache` when it finds the decode attention pattern after the cache rewrite; the
prefill kernel by `edgecc.ir_passes.fuse_attention` (every CPU build, including LLM prefill graphs).
"""

from __future__ import annotations

from tvm import tirx

from edgecc.schedules.base import lane_sum

OP_PATTERN_OPAQUE = 8
SCHEDULE_NAME = "edgecc.decode_attention"
PREFILL_SCHEDULE_NAME = "edgecc.prefill_attention"
LAYOUTS = ("bhsd", "bshd")  # [batch, heads, seq, head_dim] or [batch, seq, heads, head_dim]


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
                    s[gi, t] = lane_sum(part[T.ramp(T.int64(0), T.int64(1), lanes)], lanes)
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


def _strides(layout: str, batch: int, heads: int, group: int, seq: int, head_dim: int) -> list[int]:
    """Element strides of the logical [batch, kv_head, group, seq, head_dim] view of a tensor in `layout`
    (query heads h * group + g share KV head h; K and V have group 1)."""
    hq = heads * group
    if layout == "bhsd":
        return [hq * seq * head_dim, group * seq * head_dim, seq * head_dim, head_dim, 1]
    return [seq * hq * head_dim, group * head_dim, head_dim, hq * head_dim, 1]


def prefill_blocking(lanes: int, group: int, seq: int, batch_heads: int, num_cores: int,
                     causal: bool) -> tuple[int, int, int]:
    """(query positions per block, keys per block, chunks per KV head).

    About 8 query rows per block (G heads x positions). Keys per block: 4 vectors (the per-block work of
    the online softmax, a row max and a rescale, is amortized over more keys), 2 when causal (the block
    on the diagonal is partly masked, wasted work that grows with the block). A task is one chunk of one KV
    head's query blocks: its keys are transposed once for all of them; heads are split into chunks only to
    give every core 4 tasks.
    """
    bq = max(1, min(seq, -(-8 // group)))
    while group * bq % 4 and bq < seq:  # whole groups of 4 rows for the register tiles (`_row_unroll`)
        bq += 1
    nqb = -(-seq // bq)
    chunks = max(1, min(nqb, -(-4 * max(1, num_cores) // max(1, batch_heads))))
    return bq, min(64, max(16, (2 if causal else 4) * lanes)), chunks


def _row_unroll(rows: int, vecs_per_row: int, vector_regs: int) -> int:
    """Query rows computed together in the score and V loops: independent accumulator chains (one row has
    only head_dim/lanes or block/lanes of them, too few to hide the FMA latency), within half the registers."""
    return next(u for u in (4, 2, 1) if rows % u == 0 and (u * vecs_per_row <= vector_regs // 2 or u == 1))


def prefill_attention_kernel(batch: int, kv_heads: int, group: int, seq: int, kv_seq: int, head_dim: int,
                             scale: float, causal: bool, *, lanes: int = 8, vector_regs: int = 16,
                             num_cores: int = 1,
                             mask_shape: tuple | None = None, q_layout: str = "bhsd", k_layout: str = "bhsd",
                             v_layout: str = "bhsd", out_layout: str = "bhsd",
                             dtype: str = "float32") -> tirx.PrimFunc:
    """out[b, i, h*G+g, :] = softmax_j(q . k_j * scale + mask[b, i, j]) @ v_j over keys j < kv_seq, and with
    `causal` only j <= i + (kv_seq - seq) (the query rows are the last `seq` positions).

    Buffer shapes: q/out ``[B, Hk, G*S, D]`` ("bhsd", rows g*S + i; the same memory as [B, Hk*G, S, D]) or
    ``[B, S, Hk*G, D]`` ("bshd"); k/v ``[B, Hk, Sk, D]`` or ``[B, Sk, Hk, D]``; mask ``mask_shape`` =
    (1 or B, 1, 1 or S, Sk), additive. `lanes`, `vector_regs`: the target's float32 vector width and vector
    register count (`edgecc.schedules.params`); `num_cores` sizes the tasks.
    """
    from tvm.script import tirx as T

    for layout in (q_layout, k_layout, v_layout, out_layout):
        assert layout in LAYOUTS, layout
    i64 = T.int64
    bq, bk, chunks = prefill_blocking(lanes, group, seq, batch * kv_heads, num_cores, causal)
    nqb = -(-seq // bq)
    qpc = -(-nqb // chunks)  # query blocks per chunk
    chunks = -(-nqb // qpc)
    rows = group * bq
    uq = _row_unroll(rows, -(-bk // lanes), vector_regs)
    uv = _row_unroll(rows, -(-head_dim // lanes), vector_regs)
    UQ, UV = i64(uq), i64(uv)
    B, HK, G, S, SK, D = (i64(v) for v in (batch, kv_heads, group, seq, kv_seq, head_dim))
    BQ, BK, RW, NQB, NCH, QPC = (i64(v) for v in (bq, bk, rows, nqb, chunks, qpc))
    SKP = i64(-(-kv_seq // bk) * bk)
    OFF = i64(kv_seq - seq)
    hq = kv_heads * group
    q_shape = [batch, kv_heads, group * seq, head_dim] if q_layout == "bhsd" else [batch, seq, hq, head_dim]
    o_shape = [batch, kv_heads, group * seq, head_dim] if out_layout == "bhsd" else [batch, seq, hq, head_dim]
    k_shape = [batch, kv_heads, kv_seq, head_dim] if k_layout == "bhsd" else [batch, kv_seq, kv_heads, head_dim]
    v_shape = [batch, kv_heads, kv_seq, head_dim] if v_layout == "bhsd" else [batch, kv_seq, kv_heads, head_dim]
    q_str = [i64(v) for v in _strides(q_layout, batch, kv_heads, group, seq, head_dim)]
    o_str = [i64(v) for v in _strides(out_layout, batch, kv_heads, group, seq, head_dim)]
    k_str = [i64(v) for i, v in enumerate(_strides(k_layout, batch, kv_heads, 1, kv_seq, head_dim)) if i != 2]
    v_str = [i64(v) for i, v in enumerate(_strides(v_layout, batch, kv_heads, 1, kv_seq, head_dim)) if i != 2]
    has_mask = mask_shape is not None
    mb, mq = (int(mask_shape[0]), int(mask_shape[2])) if has_mask else (1, 1)
    m_shape = [mb, 1, mq, kv_seq]
    assert bk in (16, 32, 64), bk  # reduce_row halves it down to 1
    scale_c = T.float32(scale)
    neg = T.float32(-3.0e38)
    ln2, log2e = T.float32(0.6931471805599453), T.float32(1.4426950408889634)

    @T.macro
    def exp_rows(buf, nf, pi, pf, r, n):
        # buf[r, 0:n] = exp(buf[r, 0:n]) for arguments <= 0: 2^k * poly(x - k ln2), clamped at e^-87.
        # No scalar temporaries inside the vectorized loops (TVM 0.27's vectorizer mis-broadcasts them).
        for ln in T.vectorized(n):
            buf[r, ln] = T.max(buf[r, ln], T.float32(-87.0))
        for ln in T.vectorized(n):
            nf[ln] = T.floor(buf[r, ln] * log2e + T.float32(0.5))
        for ln in T.vectorized(n):
            buf[r, ln] = buf[r, ln] - nf[ln] * ln2
        for ln in T.vectorized(n):
            buf[r, ln] = T.float32(1.0) + buf[r, ln] * (T.float32(1.0) + buf[r, ln] * (
                T.float32(0.5) + buf[r, ln] * (T.float32(1.0 / 6) + buf[r, ln] * (
                    T.float32(1.0 / 24) + buf[r, ln] * (
                        T.float32(1.0 / 120) + buf[r, ln] * T.float32(1.0 / 720))))))
        for ln in T.vectorized(n):
            pi[ln] = T.shift_left(T.Cast("int32", nf[ln]) + T.int32(127), T.int32(23))
        for ln in T.vectorized(n):
            buf[r, ln] = buf[r, ln] * pf[ln]  # pf: pi's bits as float = 2^k

    @T.macro
    def tree(t, w, is_max):
        # t[0:w] = op(t[0:w], t[w:2w]): a log-depth reduction instead of a serial chain of BK dependent ops
        if is_max:
            for ln in T.vectorized(w):
                t[ln] = T.max(t[ln], t[ln + w])
        else:
            for ln in T.vectorized(w):
                t[ln] = t[ln] + t[ln + w]

    @T.macro
    def reduce_row(t, src, r, is_max):  # t[0] = op over src[r, 0:BK] (TVMScript has no Python-level loops)
        for ln in T.vectorized(BK):
            t[ln] = src[r, ln]
        if bk >= 64:
            tree(t, 32, is_max)
        if bk >= 32:
            tree(t, 16, is_max)
        tree(t, 8, is_max)
        tree(t, 4, is_max)
        tree(t, 2, is_max)
        tree(t, 1, is_max)

    @T.macro
    def body(q_in, k_in, v_in, mask, o_out):
        q = T.decl_buffer((B, HK, G, S, D), dtype, data=q_in.data, strides=q_str)
        o = T.decl_buffer((B, HK, G, S, D), dtype, data=o_out.data, strides=o_str)
        k = T.decl_buffer((B, HK, SK, D), dtype, data=k_in.data, strides=k_str)
        v = T.decl_buffer((B, HK, SK, D), dtype, data=v_in.data, strides=v_str)
        for task in T.parallel(B * HK * NCH):
            kt = T.decl_buffer((D, SKP), dtype, scope="local")  # the keys this chunk needs, transposed
            s = T.decl_buffer((RW, BK), dtype, scope="local")  # scores, then probabilities
            acc = T.decl_buffer((RW, D), dtype, scope="local")
            mx = T.decl_buffer((RW,), dtype, scope="local")
            den = T.decl_buffer((RW, BK), dtype, scope="local")  # per-lane partial sums of the weights
            al = T.decl_buffer((1, RW), dtype, scope="local")  # old max - new max, then its exp
            red = T.decl_buffer((BK,), dtype, scope="local")
            nf = T.decl_buffer((BK + RW,), "float32", scope="local")
            pi = T.decl_buffer((BK + RW,), "int32", scope="local")
            pf = T.decl_buffer((BK + RW,), "float32", data=pi.data, scope="local")
            # keys the chunk needs: all, or (causal) up to its last position; padded to whole blocks
            for j in range(((T.min(SK, T.min(S, (task % NCH + i64(1)) * QPC * BQ) + OFF) if causal else SK)
                            + BK - i64(1)) // BK * BK):
                for dd in range(D):
                    kt[dd, j] = T.Select(j < SK, k[task // (HK * NCH), task // NCH % HK, T.min(j, SK - i64(1)), dd],
                                         T.float32(0))
            for qb in range(task % NCH * QPC, T.min(NQB, (task % NCH + i64(1)) * QPC)):
                for r in range(RW):
                    mx[r] = neg
                    for j in T.vectorized(BK):
                        den[r, j] = T.float32(0)
                    for dd in T.vectorized(D):
                        acc[r, dd] = T.float32(0)
                for kb in range((T.min(SK, qb * BQ + BQ + OFF) + BK - i64(1)) // BK if causal
                                else (SK + BK - i64(1)) // BK):
                    for r0 in range(RW // UQ):
                        for ru in T.unroll(UQ):
                            for j in T.vectorized(BK):
                                s[r0 * UQ + ru, j] = T.float32(0)
                        for dd in range(D):
                            for ru in T.unroll(UQ):
                                for j in T.vectorized(BK):
                                    s[r0 * UQ + ru, j] = s[r0 * UQ + ru, j] + q[
                                        task // (HK * NCH), task // NCH % HK, (r0 * UQ + ru) // BQ,
                                        T.min(qb * BQ + (r0 * UQ + ru) % BQ, S - i64(1)), dd] * kt[dd, kb * BK + j]
                    for r in range(RW):
                        for j in T.vectorized(BK):
                            s[r, j] = s[r, j] * scale_c
                        if has_mask:
                            if kb * BK + BK <= SK:
                                for j in T.vectorized(BK):
                                    s[r, j] = s[r, j] + mask[
                                        task // (HK * NCH) if mb > 1 else i64(0), 0,
                                        T.min(qb * BQ + r % BQ, S - i64(1)) if mq > 1 else i64(0), kb * BK + j]
                            else:
                                for j in range(SK - kb * BK):
                                    s[r, j] = s[r, j] + mask[
                                        task // (HK * NCH) if mb > 1 else i64(0), 0,
                                        T.min(qb * BQ + r % BQ, S - i64(1)) if mq > 1 else i64(0), kb * BK + j]
                        if causal:
                            for j in T.vectorized(BK):
                                s[r, j] = T.Select(kb * BK + j < T.min(SK, qb * BQ + r % BQ + OFF + i64(1)),
                                                   s[r, j], neg)
                        else:
                            for j in T.vectorized(BK):
                                s[r, j] = T.Select(kb * BK + j < SK, s[r, j], neg)
                        reduce_row(red, s, r, True)
                        al[0, r] = mx[r]
                        mx[r] = T.max(mx[r], red[0])
                        al[0, r] = al[0, r] - mx[r]
                        for j in T.vectorized(BK):
                            s[r, j] = s[r, j] - mx[r]
                        exp_rows(s, nf, pi, pf, r, BK)
                        if causal:  # masked keys weigh exactly 0, not e^-87
                            for j in T.vectorized(BK):
                                s[r, j] = T.Select(kb * BK + j < T.min(SK, qb * BQ + r % BQ + OFF + i64(1)),
                                                   s[r, j], T.float32(0))
                        else:
                            for j in T.vectorized(BK):
                                s[r, j] = T.Select(kb * BK + j < SK, s[r, j], T.float32(0))
                    exp_rows(al, nf, pi, pf, 0, RW)
                    for r in range(RW):
                        for j in T.vectorized(BK):
                            den[r, j] = den[r, j] * al[0, r] + s[r, j]
                        for dd in T.vectorized(D):
                            acc[r, dd] = acc[r, dd] * al[0, r]
                    for r0 in range(RW // UV):
                        for j in range(T.min(BK, SK - kb * BK)):
                            for ru in T.unroll(UV):
                                for dd in T.vectorized(D):
                                    acc[r0 * UV + ru, dd] = acc[r0 * UV + ru, dd] + s[r0 * UV + ru, j] * v[
                                        task // (HK * NCH), task // NCH % HK, kb * BK + j, dd]
                for r in range(RW):
                    if qb * BQ + r % BQ < S:
                        reduce_row(red, den, r, False)
                        for dd in T.vectorized(D):
                            o[task // (HK * NCH), task // NCH % HK, r // BQ, qb * BQ + r % BQ, dd] = \
                                acc[r, dd] / red[0]

    attrs = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
             "edgecc.schedule": PREFILL_SCHEDULE_NAME}
    if has_mask:
        @T.prim_func(private=True)
        def prefill_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr(attrs)
            q_in = T.match_buffer(q_h, q_shape, dtype)
            k_in = T.match_buffer(k_h, k_shape, dtype)
            v_in = T.match_buffer(v_h, v_shape, dtype)
            mask = T.match_buffer(m_h, m_shape, dtype)
            o_out = T.match_buffer(o_h, o_shape, dtype)
            body(q_in, k_in, v_in, mask, o_out)
    else:
        @T.prim_func(private=True)
        def prefill_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
            T.func_attr(attrs)
            q_in = T.match_buffer(q_h, q_shape, dtype)
            k_in = T.match_buffer(k_h, k_shape, dtype)
            v_in = T.match_buffer(v_h, v_shape, dtype)
            o_out = T.match_buffer(o_h, o_shape, dtype)
            body(q_in, k_in, v_in, None, o_out)

    return prefill_attention
