"""4-bit weights x float activations for a few rows (decode GEMV), hand-written (schemes `w4g<G>[-asym]`).

Why: the generic kernel (`edgecc.schedules.quantized`) decodes each code as shift, mask, int->float convert,
then FMA: four vector instructions per 16 multiply-adds, and TIR's schedule cannot prefetch, so a w4 decode
step was bound by instructions (~13 GB/s with the weights in cache), not by the DRAM it streams.

Decode without a convert: a nibble q placed in bits 19..22 of the float 1.0 (0x3F800000) is exactly
``1 + q / 16``. So each code costs one shift (by 19 - 4i, left or right, for code i of a word) and one
``(t & 0x00780000) | 0x3F800000`` (a single `vpternlogd` on AVX-512), then the FMA. Per group and column

    acc = c0 + sum_j x_j * (1 + q_j / 16),   c0 = -(1 + zero / 16) * xsum_g
        = (sum_j x_j q_j - zero * xsum_g) / 16

which is the generic kernel's `part - zero * xsum` over 16 (zero = 8 for symmetric codes; xsum_g is the
group sum of x, computed once per call). y = 16 * sum_g scale * acc. In float32 the terms x * (1 + q/16) are
at most twice x and the sum cancels against c0, so rounding is a few ulps of sum |x| per group, as for
the generic kernel.

Paired decode (AVX-512 with VBMI: Ice Lake and newer, Zen 4; `has_pair_decode`): codes i and i + 4 of a word
are 16 bits apart, and one `vpmultishiftqb` (a per-byte bit-field move, port 5) puts code i in bits 0..3 and
code i + 4 in bits 19..22. `vpermps` reads only its index's low 4 bits, so it looks code i up in a
16-entry table of q / 16 (exact, nothing implicit), and the mask-or above turns bits 19..22 into 1 + q / 16.
Per word 4 moves + 4 lookups + 4 mask-ors + 8 FMAs = 20 instructions instead of 8 shifts (port 0 only) +
8 mask-ors + 8 FMAs = 24, and c0 counts the implicit 1.0 of codes 4..7 only. Measured (2 threads, alternating):
the GEMV alone at 0.83-0.99x the shifted decode's time with its weights in cache and 0.92-0.97x from DRAM, but
a whole SmolLM2 w4 decode step within noise of it (two artifacts in one process, 100 alternating steps at
context 128, twice: shifted/paired 0.991 and 0.994): the step is bound by memory more than by instructions.

Weights: the ordinary tile-major 4-bit storage [N / T, K / 8, T] uint32 (word w of column c holds the codes of
k = 8w .. 8w+7, code i in bits 4i..4i+3). A job is `vb` column vectors of one tile over all of K (a whole tile
where that leaves two jobs per core: one contiguous stream); the m rows share each decoded code. With fewer
than 8 accumulators the FMA latency chains would bound the loop, so even and odd codes then go to two chains.
From `edgecc.schedules.int4_dot` it takes the software prefetch (~4 KB ahead in the job's own stream, issued
once per group) and the code-generation rules: vector indices stay literal `T.ramp`s, and the accumulators
are vector-typed buffers (one element per vector register, e.g. `float32x16`) so LLVM keeps them
in registers.

Used by default on AVX-512 only (`enabled`; AVX2 and NEON with `EDGECC_INT4_FLOAT=1`); `EDGECC_INT4_FLOAT=0`
keeps the generic kernel (A/B timing).
"""

from __future__ import annotations

import os

from tvm import tirx

from edgecc.schedules.base import lane_sum
from edgecc.schedules.int4_dot import PREFETCH_BYTES, prefetch
from edgecc.schedules.int8_dot import OP_PATTERN_OPAQUE

SCHEDULE_NAME = "edgecc.int4_float"
#: rows up to which the kernel is used (a decode step's GEMV; more rows go to the generic kernels)
MAX_ROWS = 4
_CACHE_LINE = 64


def enabled(lanes_regs) -> bool:
    """`EDGECC_INT4_FLOAT=0` keeps the generic kernel, `=1` takes this one wherever it applies; unset, AVX-512
    only. Without AVX-512's ternary logic the decode is shift, and, or (4 instructions, like the generic
    kernel's shift, and, convert): on AVX2 (run here on an AVX-512 core) it timed within noise of the generic
    kernel (-5% .. +13%), and NEON is checked for correctness under qemu only."""
    env = os.environ.get("EDGECC_INT4_FLOAT")
    if env in ("0", "1"):
        return env == "1"
    return lanes_regs is not None and lanes_regs[0] >= 16


def target_lanes(target) -> tuple[int, int] | None:
    """(float32 lanes, vector registers) of an LLVM CPU target with AVX2 / AVX-512 / NEON, else None."""
    if target is None or target.kind.name != "llvm":
        return None
    from tvm.target import codegen

    try:
        triple = str(target.attrs.get("mtriple", "")) if "mtriple" in target.attrs else ""
        if triple.startswith("aarch64") or triple.startswith("arm64"):
            return (4, 32) if codegen.target_has_features("neon", target) else None
        if codegen.target_has_features("avx512f", target):
            return 16, 32
        if codegen.target_has_features("avx2", target) and codegen.target_has_features("fma", target):
            return 8, 16
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: generic kernel
        return None
    return None


def has_pair_decode(target) -> bool:
    """Whether `target` has what the paired decode needs: AVX-512 VBMI (`vpmultishiftqb`; Ice Lake and newer
    Intel cores, Zen 4). `EDGECC_INT4_PAIRED=0` keeps the shifted decode (A/B timing)."""
    if os.environ.get("EDGECC_INT4_PAIRED") == "0" or target_lanes(target) != (16, 32):
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx512vbmi", target))
    except Exception:  # noqa: BLE001
        return False


def supports(lanes_regs, bits: int, group: int, k: int, n: int, tile: int, rows) -> bool:
    """Whether the kernel covers `rows` x [K, N] 4-bit weights in groups of `group`, column tiles of `tile`."""
    return (lanes_regs is not None and bits == 4 and isinstance(rows, int) and 1 <= rows <= MAX_ROWS
            and group % 8 == 0 and k % group == 0 and n % tile == 0 and tile % lanes_regs[0] == 0)


def _register_tile(lanes: int, regs: int, n: int, tile: int, rows: int, cores: int) -> int:
    """Column vectors per job: the widest whose accumulators fit (2 per row and vector, plus ~6 temporaries)
    and that leaves at least two jobs per core. Whole tiles beat an even split: 1x1536x576 (9 tiles, 2 threads,
    weights from DRAM) ran at 16.2 GB/s in 9 jobs of 4 vectors, 13.1 GB/s in 18 half-tile jobs."""
    nvec, tiles = tile // lanes, n // tile
    widths = [v for v in (4, 2, 1) if nvec % v == 0 and 2 * rows * v + 6 <= regs] or [1]
    for least in (2 * cores, cores):
        for v in widths:
            if tiles * (nvec // v) >= least:
                return v
    return widths[-1]


def int4_float_matmul_kernel(m: int, k: int, n: int, group: int, tile: int, lanes: int, symmetric: bool,
                             regs: int = 32, cores: int = 1, vb: int | None = None,
                             paired: bool = False) -> tirx.PrimFunc:
    """y[m, N] = x[m, K] @ dequant(W), W 4-bit in groups of `group` (static m <= MAX_ROWS).

    Arguments as `quantized_matmul_compute` orders them: x float32 [m, K], qweight uint32 [N/T, K/8, T],
    scales float32 [N/T, K/G, T], zeros uint8 [N/T, K/G, T] (asymmetric only), y float32 [m, N]. `vb`: column
    vectors per job (default `_register_tile`'s). `paired`: decode two codes per `vpmultishiftqb` (AVX-512 VBMI,
    see `has_pair_decode`) instead of one per shift.
    """
    from tvm.script import tirx as T

    vb = vb or _register_tile(lanes, regs, n, tile, m, cores)
    assert not paired or lanes == 16, "the paired decode is AVX-512 (VBMI) only"
    groups, wpg = k // group, group // 8
    M, K, N, KW, GS = T.int64(m), T.int64(k), T.int64(n), T.int64(k // 8), T.int64(group)
    NG, WPG = T.int64(groups), T.int64(wpg)
    NT, TT, VB, LN = T.int64(n // tile), T.int64(tile), T.int64(vb), T.int64(lanes)
    JT = T.int64(tile // (lanes * vb))
    # FMA latency: with fewer than 8 accumulators the dependent chains, not the ports, bound the loop; a second
    # chain per accumulator (odd codes) where registers allow
    chains = 2 if m * vb < 8 and 3 * m * vb + 6 <= regs else 1
    CH, MV = T.int64(chains), T.int64(m * vb)
    fvec = f"float32x{lanes}"
    sw = 16 if group % 16 == 0 else 8  # slice width of the group sums (groups are whole words: 8 | group)
    SWL = T.int64(sw)
    high_codes = T.Cast(f"float32x{sw}", T.floormod(T.floordiv(T.ramp(T.int32(0), T.int32(1), sw),
                                                               T.broadcast(T.int32(4), sw)),
                                                    T.broadcast(T.int32(2), sw)))  # 0 0 0 0 1 1 1 1 ...
    # lines of one job's weight row, and rows (of the tile) the prefetch runs ahead: whole groups
    row_bytes = vb * lanes * 4
    lines = max(1, row_bytes // _CACHE_LINE)
    per_line = T.int64(_CACHE_LINE // 4)
    pf_groups = T.int64(max(1, -(-PREFETCH_BYTES // (row_bytes * wpg))))

    def code(word, i):
        """Code i of each word as the float 1 + q / 16: the nibble moved into mantissa bits 19..22 (`i` is an
        unrolled loop variable: the branch folds away)."""
        sh = T.Cast("int32", T.int64(19) - T.int64(4) * i)
        t = T.if_then_else(sh > 0, T.shift_left(word, T.broadcast(sh, lanes)),
                           T.shift_right(word, T.broadcast(-sh, lanes)))  # arithmetic: sign bits masked off
        bits = T.bitwise_or(T.bitwise_and(t, T.broadcast(T.int32(0x00780000), lanes)),
                            T.broadcast(T.int32(0x3F800000), lanes))
        return T.reinterpret(fvec, bits)

    def code_pair(word, s):
        """Codes s and s + 4 of each word (s < 4: 16 bits apart), both exact: one `vpmultishiftqb` moves code s
        to bits 0..3 and code s + 4 to bits 19..22; `vpermps` looks up the low 4 bits in a table of q / 16,
        and the mask-or of `code` turns bits 19..22 into 1 + q / 16. Each qword holds two lanes' words: the
        odd lane's byte offsets are 32 more."""
        # byte offsets 4s, 4s + 13 (even lane), 4s + 32, 4s + 45 (odd lane) in bytes 0, 2, 4, 6 of each qword
        # (`s` is an unrolled loop variable: the control folds to a constant)
        base = sum(o << (8 * b) for b, o in ((0, 0), (2, 13), (4, 32), (6, 45)))
        step = sum(4 << (8 * b) for b in (0, 2, 4, 6))
        ctrl = T.int64(base) + T.Cast("int64", s) * T.int64(step)
        moved = T.reinterpret(f"int32x{lanes}", T.call_llvm_pure_intrin(
            "int8x64", "llvm.x86.avx512.pmultishift.qb.512", T.reinterpret("int8x64", T.broadcast(ctrl, 8)),
            T.reinterpret("int8x64", word)))
        table = T.Cast(fvec, T.ramp(T.int32(0), T.int32(1), lanes)) * T.broadcast(T.float32(0.0625), lanes)
        low = T.call_llvm_pure_intrin(fvec, "llvm.x86.avx512.permvar.sf.512", table, moved)
        high = T.reinterpret(fvec, T.bitwise_or(T.bitwise_and(moved, T.broadcast(T.int32(0x00780000), lanes)),
                                                T.broadcast(T.int32(0x3F800000), lanes)))
        return low, high

    def wvec(t, row, v):
        return T.ramp((t * KW + row) * TT + v, T.int64(1), lanes)

    @T.macro
    def body(x, w, s, zr, y):
        wi = T.decl_buffer((NT * KW * TT,), "int32", data=w.data)
        sf = T.decl_buffer((NT * NG * TT,), "float32", data=s.data)
        zf = T.decl_buffer((NT * NG * TT,), "uint8", data=(s if zr is None else zr).data)  # unused if symmetric
        xf = T.decl_buffer((M * K,), "float32", data=x.data)
        # 1. per row and group: -xsum (the start of each group's accumulator, with the zero point's term)
        xs = T.decl_buffer((M * NG,), "float32")
        xh = T.decl_buffer((M * NG,), "float32")  # paired decode: the sum of x over codes 4..7 of each word
        # (a vector of partial sums over the group's SW-wide slices, then a tree over its lanes: a scalar loop
        # was a 32-deep chain of dependent adds per group, on the calling thread before the parallel part)
        for i in range(M):
            for g in range(NG):
                part = T.decl_buffer((SWL,), "float32", scope="local")
                for ln in T.vectorized(SWL):
                    part[ln] = T.float32(0)
                for j in range(GS // SWL):
                    for ln in T.vectorized(SWL):
                        part[ln] = part[ln] + xf[i * K + g * GS + j * SWL + ln]
                xs[i * NG + g] = lane_sum(part[T.ramp(T.int64(0), T.int64(1), sw)], sw)
                if paired:  # codes 4..7 of each word: lanes 4..7 of every 8 (the slices are whole words)
                    xh[i * NG + g] = lane_sum(part[T.ramp(T.int64(0), T.int64(1), sw)] * high_codes, sw)
        # 2. jobs: vb column vectors of one tile, all K, m rows in registers
        for job in T.parallel(NT * JT):
            acc = T.decl_buffer((CH * M * VB,), fvec, scope="local")  # one group: CH chains (even, odd codes)
            accf = T.decl_buffer((M * VB,), fvec, scope="local")  # across groups
            t = job // JT
            c0 = job % JT * VB * LN
            for a in T.unroll(M * VB):
                accf[a] = T.broadcast(T.float32(0), lanes)
            for g in range(NG):
                # the next groups' weights (and scales, zero points), ~PREFETCH_BYTES ahead, once per group
                for kw in T.unroll(WPG):
                    for ln in T.unroll(T.int64(lines)):
                        T.evaluate(prefetch(wi[T.min(
                            (t * KW + (g + pf_groups) * WPG + kw) * TT + c0 + ln * per_line, NT * KW * TT - LN)]))
                for v in T.unroll(VB):
                    T.evaluate(prefetch(sf[T.min(
                        (t * NG + g + pf_groups) * TT + c0 + v * LN, NT * NG * TT - LN)]))
                if not symmetric:
                    T.evaluate(prefetch(zf[T.min(
                        (t * NG + g + pf_groups) * TT + c0, NT * NG * TT - LN)]))
                if chains == 2:
                    for a in T.unroll(M * VB):
                        acc[MV + a] = T.broadcast(T.float32(0), lanes)
                for r in T.unroll(M):
                    for v in T.unroll(VB):
                        # what the decode adds per unit of x: 1 for every code (shifted decode), or 1 for codes
                        # 4..7 and 0 for codes 0..3 (paired decode: the table holds q / 16 itself)
                        if paired:
                            implicit = xh[r * NG + g]
                        else:
                            implicit = xs[r * NG + g]
                        if symmetric:  # zero point 8
                            acc[r * VB + v] = T.broadcast(-implicit - xs[r * NG + g] * T.float32(0.5), lanes)
                        else:
                            acc[r * VB + v] = T.broadcast(-implicit, lanes) - T.Cast(
                                fvec, zf[T.ramp((t * NG + g) * TT + c0 + v * LN, T.int64(1), lanes)]) * \
                                T.broadcast(xs[r * NG + g] * T.float32(0.0625), lanes)
                for kw in T.unroll(WPG):
                    for v in T.unroll(VB):
                        word = wi[wvec(t, g * WPG + kw, c0 + v * LN)]
                        if paired:  # one vpmultishiftqb serves codes i and i + 4 (16 bits apart)
                            for i in T.unroll(4):
                                low, high = code_pair(word, i)
                                for r in T.unroll(M):
                                    acc[i % CH * MV + r * VB + v] = acc[i % CH * MV + r * VB + v] + T.broadcast(
                                        xf[r * K + (g * WPG + kw) * T.int64(8) + i], lanes) * low
                                    acc[(i + 1) % CH * MV + r * VB + v] = acc[(i + 1) % CH * MV + r * VB + v] + \
                                        T.broadcast(xf[r * K + (g * WPG + kw) * T.int64(8) + i + 4],
                                                    lanes) * high
                        else:
                            for i in T.unroll(8):
                                for r in T.unroll(M):
                                    acc[i % CH * MV + r * VB + v] = acc[i % CH * MV + r * VB + v] + T.broadcast(
                                        xf[r * K + (g * WPG + kw) * T.int64(8) + i], lanes) * code(word, i)
                if chains == 2:
                    for a in T.unroll(M * VB):
                        acc[a] = acc[a] + acc[MV + a]
                for r in T.unroll(M):
                    for v in T.unroll(VB):
                        accf[r * VB + v] = accf[r * VB + v] + sf[
                            T.ramp((t * NG + g) * TT + c0 + v * LN, T.int64(1), lanes)] * acc[r * VB + v]
            for r in T.unroll(M):
                for v in T.unroll(VB):
                    y[r, T.ramp(t * TT + c0 + v * LN, T.int64(1), lanes)] = accf[r * VB + v] * T.broadcast(
                        T.float32(16), lanes)

    if symmetric:
        @T.prim_func(private=True)
        def int4_float_matmul(x: T.Buffer((M, K), "float32"), w: T.Buffer((NT, KW, TT), "uint32"),
                              s: T.Buffer((NT, NG, TT), "float32"), y: T.Buffer((M, N), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                         "edgecc.schedule": SCHEDULE_NAME})
            body(x, w, s, None, y)

        return int4_float_matmul

    @T.prim_func(private=True)
    def int4_float_matmul_asym(x: T.Buffer((M, K), "float32"), w: T.Buffer((NT, KW, TT), "uint32"),
                               s: T.Buffer((NT, NG, TT), "float32"), zr: T.Buffer((NT, NG, TT), "uint8"),
                               y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                     "edgecc.schedule": SCHEDULE_NAME})
        body(x, w, s, zr, y)

    return int4_float_matmul_asym
