"""4-bit weights x int8 activations on the CPU's int8 dot-product instructions (schemes `w4g<G>a8[-asym]`).

Why: a w4 GEMV with float activations decodes every code to float before its multiply-add — shift, mask,
convert, FMA for 16 weights — so a decode step is bound by instructions, not by the DRAM it streams
(SmolLM2 w4: ~3.6x its bandwidth floor, fp32: ~2x). With the activations on an int8 grid the nibbles feed
`vpdpbusd` (AVX-512 VNNI: 64 multiply-adds) or `sdot` (Arm dotprod: 16) directly: two masks (and, for
`sdot`'s signed bytes, a shift) turn one vector of packed words into two dot-product operands. This is what
llama.cpp does (Q4 x Q8) and what onnxruntime's MatMulNBits does at accuracy level 4.

Weights: the ordinary 4-bit storage (`edgecc.compress.schemes`): tile-major [N / T, K / 8, T] uint32, word w
of column c holding the codes of k = 8w .. 8w+7, code i in bits 4i..4i+3. So for a vector of columns
``word & 0x0F0F0F0F`` is, per column, the bytes of k = 8w + 0, 2, 4, 6 and ``(word >> 4) & 0x0F0F0F0F`` those
of k = 8w + 1, 3, 5, 7 (codes 0..15: valid unsigned and signed bytes). The activations are stored in that
order (evens, then odds, per 8 k) once per call, so no shuffles are needed in the loop.

Activations: per row and per weight group of G features, scale sx = max|x| / 127 (1 when all zero), codes
round(x / sx) clamped to +-127 — the grid `quantized_matmul_compute` gives the generic kernel of the same
scheme, so both compute the same function. Per group the int32 dot product is exact; the epilogue adds
``scale[g, c] * sx[g] * (dot - zero[g, c] * sum_g(xq))`` in float (zero = 8 for symmetric codes).

Code generation (what kept the GEMV at ~6.5 GB/s before): every vector index must stay a literal `T.ramp`.
A ramp bound to a name in the TVMScript body becomes a let-bound vector, and LLVM then loads it as 16 scalar
loads (the per-group scales were gathered that way) and keeps the accumulators in memory. Accumulators are
zeroed as whole vectors so they stay in registers.
"""

from __future__ import annotations

from tvm import tirx

from edgecc.schedules.prefetch import prefetch  # noqa: F401 (re-export: the int4 kernels' prefetch)
from edgecc.schedules.int8_dot import DOT_ISAS, OP_PATTERN_OPAQUE, target_dot_isa  # noqa: F401 (re-export)

SCHEDULE_NAME = "edgecc.int4_dot"
#: how far ahead of its loads a GEMV job prefetches its packed weights
PREFETCH_BYTES = 4096


def target_isa(target) -> str | None:
    """The dot-product ISA this kernel uses on a TVM target: AVX-512 VNNI, AVX-VNNI (ymm, no AVX-512) or Arm
    dotprod (i8mm CPUs have dotprod too; smmla pairs rows, which a GEMV does not have)."""
    from edgecc.schedules.int8_dot import target_int8_isa

    isa = target_int8_isa(target)
    return "dotprod" if isa == "i8mm" else isa


def supports(isa: str | None, bits: int, group: int, k: int, n: int, tile: int) -> bool:
    """Whether the kernel covers a [K, N] 4-bit weight in groups of `group`, stored in column tiles of `tile`."""
    return (isa in DOT_ISAS and bits == 4 and group % 8 == 0 and k % group == 0 and n % tile == 0
            and tile % DOT_ISAS[isa][0] == 0)


def _register_tile(isa: str, n: int, tile: int, rows_hint, cores: int) -> tuple[int, int]:
    """(mr rows, vb column vectors) per register tile; a GEMV keeps an even share of jobs for every core."""
    lanes = DOT_ISAS[isa][0]
    nvec = tile // lanes
    tiles = n // tile
    mr = 1 if isinstance(rows_hint, int) and rows_hint == 1 else 4
    widths = (4, 2) if mr == 1 else (2,)  # 2 * mr * vb int32 + mr * vb float accumulators in 32 registers
    vb = 1
    for v in widths:  # the widest tile whose job count splits evenly over the cores (static chunks)
        jobs = tiles * (nvec // v) if nvec % v == 0 else 0
        if jobs >= 2 * cores and jobs % cores == 0:
            vb = v
            break
    else:
        for v in widths:
            if nvec % v == 0 and tiles * (nvec // v) >= 4 * cores:
                vb = v
                break
    return mr, vb


def int4_dot_matmul_kernel(k: int, n: int, group: int, tile: int, isa: str, symmetric: bool, rows=None,
                           cores: int = 1) -> tirx.PrimFunc:
    """y[m, N] = x[m, K] @ dequant(W) with x on its per-(row, group) int8 grid; W 4-bit in groups of `group`.

    Arguments as `quantized_matmul_compute` orders them: x float32 [m, K] (m symbolic), qweight uint32
    [N/T, K/8, T], scales float32 [N/T, K/G, T], zeros uint8 [N/T, K/G, T] (asymmetric only), y [m, N].
    """
    from tvm.script import tirx as T

    lanes, intrin = DOT_ISAS[isa]
    mr, vb = _register_tile(isa, n, tile, rows, cores)
    groups, wpg = k // group, group // 8
    K, N, KW, GS = T.int64(k), T.int64(n), T.int64(k // 8), T.int64(group)
    NG, WPG = T.int64(groups), T.int64(wpg)
    NT, TT, MR, VB, LN = T.int64(n // tile), T.int64(tile), T.int64(mr), T.int64(vb), T.int64(lanes)
    JT = T.int64(tile // (lanes * vb))
    vec, fvec, bytes_vec = f"int32x{lanes}", f"float32x{lanes}", f"int8x{lanes * 4}"
    low = T.int32(0x0F0F0F0F)
    # a few rows quantize faster on one core than a parallel launch takes
    row_loop = T.serial if isinstance(rows, int) and rows < 8 else T.parallel

    # software prefetch ~4 KB ahead in the job's own weight stream: a GEMV's weights come from DRAM, and one
    # core's hardware prefetcher alone kept ~8 GB/s in flight (1 thread, 576x1536: 0.84-0.89x the time)
    pf_rows = T.int64(max(1, PREFETCH_BYTES // (tile * 4)))
    pf_groups = T.int64(max(1, PREFETCH_BYTES // (tile * 4) // wpg))
    # vpdpbusd multiplies unsigned weight bytes: the high nibbles are used in place (16 x code, <= 240), one
    # AND instead of a shift and an AND (shifts share AVX-512's port 0 with vpdpbusd); their sums are 16x, exact.
    # sdot's bytes are signed, so there the high nibbles are shifted down.
    in_place = isa in ("avx512_vnni", "avxvnni")

    def nibbles(word, high: bool):
        if high and in_place:
            return T.reinterpret(bytes_vec, T.bitwise_and(word, T.broadcast(T.int32(-0x0F0F0F10), lanes)))
        if high:
            word = T.shift_right(word, T.broadcast(T.int32(4), lanes))
        return T.reinterpret(bytes_vec, T.bitwise_and(word, T.broadcast(low, lanes)))

    def part(v, high: bool):
        """The accumulator lanes of column vector v: even k (low nibbles) and odd k in separate chains."""
        return T.ramp((v + (VB if high else 0)) * LN, T.int64(1), lanes)

    def dot(acc, r, v):
        hi = acc[r, part(v, True)]
        if in_place:
            hi = T.shift_right(hi, T.broadcast(T.int32(4), lanes))
        return acc[r, part(v, False)] + hi

    def acts(xqi, i, kk):
        return T.reinterpret(bytes_vec, T.broadcast(xqi[i, kk], lanes))

    def zero_of(zf, t, g, c0):
        if symmetric:
            return T.broadcast(T.int32(8), lanes)
        return T.Cast(vec, zf[T.ramp((t * NG + g) * TT + c0, T.int64(1), lanes)])

    @T.macro
    def body(x, w, s, zr, y, m):
        wi = T.decl_buffer((NT * KW * TT,), "int32", data=w.data)
        sf = T.decl_buffer((NT * NG * TT,), "float32", data=s.data)
        zf = T.decl_buffer((NT * NG * TT,), "uint8", data=(s if zr is None else zr).data)  # unused if symmetric
        xq = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, K), "int8")  # per 8 k: the 4 even k, then the 4 odd k
        xqi = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, K // T.int64(4)), "int32", data=xq.data)
        sx = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, NG), "float32")
        xs = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, NG), "int32")
        # 1. rows of x -> int8 codes per group, their scale and sum; padding rows are zeros
        for i in row_loop((m + MR - T.int64(1)) // MR * MR):
            for g in range(NG):
                amax = T.decl_buffer((1,), "float32", scope="local")
                tot = T.decl_buffer((1,), "int32", scope="local")
                amax[0] = T.float32(0)
                tot[0] = 0
                if i < m:
                    # max |x| over 8 lanes, then across them: a scalar chain of G maxima costs more than the dots
                    amax8 = T.decl_buffer((8,), "float32", scope="local")
                    amax8[T.ramp(T.int64(0), T.int64(1), 8)] = T.broadcast(T.float32(0), 8)
                    for j8 in range(GS // T.int64(8)):
                        amax8[T.ramp(T.int64(0), T.int64(1), 8)] = T.max(amax8[T.ramp(T.int64(0), T.int64(1), 8)],
                                                                       T.fabs(x[i, T.ramp(g * GS + j8 * T.int64(8),
                                                                                          T.int64(1), 8)]))
                    for j in range(8):
                        amax[0] = T.max(amax[0], amax8[j])
                    sx[i, g] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
                    for j in range(GS):
                        q = T.Cast("int8", T.max(T.min(T.round(x[i, g * GS + j] / sx[i, g]), T.float32(127)),
                                                 T.float32(-127)))
                        # k = 8w + p  ->  byte 8w + (p // 2) + 4 * (p % 2)
                        xq[i, g * GS + j // T.int64(8) * T.int64(8) + j % T.int64(8) // T.int64(2)
                           + j % T.int64(2) * T.int64(4)] = q
                        tot[0] = tot[0] + T.Cast("int32", q)
                else:
                    sx[i, g] = T.float32(0)
                    for j in range(GS):
                        xq[i, g * GS + j] = T.int8(0)
                xs[i, g] = tot[0]
        # 2. register tiles of mr rows x vb vectors of columns; int32 per group, float across groups
        for job in T.parallel(NT * JT):
            acc = T.decl_buffer((MR, T.int64(2) * VB * LN), "int32", scope="local")
            accf = T.decl_buffer((MR, VB * LN), "float32", scope="local")
            t = job // JT
            c0 = job % JT * VB * LN
            for ib in range((m + MR - T.int64(1)) // MR):
                for r in T.unroll(MR):
                    for v in T.unroll(VB):
                        accf[r, T.ramp(v * LN, T.int64(1), lanes)] = T.broadcast(T.float32(0), lanes)
                for g in range(NG):
                    for r in T.unroll(MR):
                        for v in T.unroll(T.int64(2) * VB):  # whole vectors: the accumulators stay in registers
                            acc[r, T.ramp(v * LN, T.int64(1), lanes)] = T.broadcast(T.int32(0), lanes)
                    for v in T.unroll(VB):  # the scales (and zero points) as far ahead as the weights
                        T.evaluate(prefetch(sf[T.min(
                            (t * NG + g + pf_groups) * TT + c0 + v * LN, NT * NG * TT - LN)]))
                    if not symmetric:
                        T.evaluate(prefetch(zf[T.min(
                            (t * NG + g + pf_groups) * TT + c0, NT * NG * TT - LN)]))
                    for kw in T.unroll(WPG):
                        for v in T.unroll(VB):
                            # one 64-byte line per (kw, v), clamped to the buffer (past its end near the last rows)
                            T.evaluate(prefetch(wi[T.min(
                                (t * KW + g * WPG + kw + pf_rows) * TT + c0 + v * LN, NT * KW * TT - LN)]))
                            word = wi[T.ramp(((t * KW + g * WPG + kw) * TT + c0 + v * LN), T.int64(1), lanes)]
                            for r in T.unroll(MR):
                                acc[r, part(v, False)] = T.call_llvm_pure_intrin(
                                    vec, intrin, acc[r, part(v, False)], nibbles(word, False),
                                    acts(xqi, ib * MR + r, (g * WPG + kw) * T.int64(2)))
                                acc[r, part(v, True)] = T.call_llvm_pure_intrin(
                                    vec, intrin, acc[r, part(v, True)], nibbles(word, True),
                                    acts(xqi, ib * MR + r, (g * WPG + kw) * T.int64(2) + T.int64(1)))
                    for r in T.unroll(MR):
                        for v in T.unroll(VB):
                            accf[r, T.ramp(v * LN, T.int64(1), lanes)] = accf[
                                r, T.ramp(v * LN, T.int64(1), lanes)] + sf[
                                T.ramp((t * NG + g) * TT + c0 + v * LN, T.int64(1), lanes)] * (T.Cast(
                                    fvec, dot(acc, r, v) - zero_of(
                                        zf, t, g, c0 + v * LN) * T.broadcast(xs[ib * MR + r, g], lanes))
                                    * T.broadcast(sx[ib * MR + r, g], lanes))
                for r in range(MR):
                    if ib * MR + r < m:
                        for v in T.vectorized(VB * LN):
                            y[ib * MR + r, t * TT + c0 + v] = accf[r, v]

    if symmetric:
        @T.prim_func(private=True)
        def int4_dot_matmul(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                         "edgecc.schedule": SCHEDULE_NAME})
            m = T.int64()
            x = T.match_buffer(x_h, (m, K), "float32")
            w = T.match_buffer(w_h, (NT, KW, TT), "uint32")
            s = T.match_buffer(s_h, (NT, NG, TT), "float32")
            y = T.match_buffer(y_h, (m, N), "float32")
            body(x, w, s, None, y, m)

        return int4_dot_matmul

    @T.prim_func(private=True)
    def int4_dot_matmul_asym(x_h: T.handle, w_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                     "edgecc.schedule": SCHEDULE_NAME})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        w = T.match_buffer(w_h, (NT, KW, TT), "uint32")
        s = T.match_buffer(s_h, (NT, NG, TT), "float32")
        zr = T.match_buffer(z_h, (NT, NG, TT), "uint8")
        y = T.match_buffer(y_h, (m, N), "float32")
        body(x, w, s, zr, y, m)

    return int4_dot_matmul_asym
