"""w8a8 matmul on the CPU's int8 dot-product instructions: AVX-512 VNNI (`vpdpbusd`), AVX-VNNI (`vpdpbusd`
on ymm, AVX2 CPUs), Arm dotprod (`sdot`) and Arm i8mm (`smmla`).

Why a hand-written kernel: LLVM does not turn an int32 sum of int8 products written in TIR into dot-product
instructions, so the generic w8a8 path computes in fp32 (16 multiply-adds per AVX-512 instruction). One
`vpdpbusd` does 64 int8 multiply-adds, one `sdot` 16 — the reason llama.cpp and onnxruntime quantize
activations at all.

Weight layout (`pack_k4`, what params.bin holds for w8a8): the [K, N] int8 codes in column tiles of T
(`edgecc.compress.schemes.column_tile`), and inside a tile each column's 4 consecutive k values side by side:
element (k, c) is at ``[c // T, k // 4, (c % T) * 4 + k % 4]`` (K padded to a multiple of 4 with zeros). So
one 64-byte load is 16 columns x 4 k (one `vpdpbusd` operand; 32 bytes on ymm) and one 16-byte load is 4
columns x 4 k (one `sdot` operand), and a GEMV streams each tile's rows as one contiguous block.

Per call: each row of x is quantized to int8 (scale max|x| / 127, round, clamp to ±127 — the same grid as
the generic w8a8 kernel), then register tiles of `mr` rows x `vb` vectors of columns accumulate in int32 over
K/4 steps; the epilogue applies row scale x column scale. `vpdpbusd` multiplies unsigned by signed bytes:
the weights enter as unsigned (code XOR 0x80 = code + 128) and the activations as signed, and the extra
``128 * sum_k xq[m, k]`` is subtracted per row. Results are exact integer dot products times the two scales,
identical to the generic kernel's.

Arm i8mm (`smmla`, 32 multiply-adds: a 2x8 block of rows times an 8x2 block of columns into a 2x2 int32
tile, twice `sdot`'s work per instruction) reads the same `pack_k4` weights, so a model's params.bin does
not depend on which Arm core runs it: two 16-byte loads (k4 rows kk and kk+1 of 4 columns) zipped by 32-bit
lanes are the `smmla` operands of columns (c, c+1) and (c+2, c+3) over 8 k. The activations are quantized
straight into the pair-interleaved layout `smmla` reads ([rows / 2, K / 8, 2 x 8]). A single row (decode)
takes `sdot` instead at run time (`smmla` would waste half its work on a zero row); an odd K / 4 ends with
one `smmla` whose upper 4 k are zero; a tile that is not a multiple of 4 columns is copied once per call
into a zero-padded scratch (rare: tiny heads).
"""

from __future__ import annotations

import numpy as np
from tvm import tirx

OP_PATTERN_OPAQUE = 8
SCHEDULE_NAME = "edgecc.int8_dot"

#: ISA -> (int32 lanes of one dot-product instruction, LLVM intrinsic)
DOT_ISAS = {
    "avx512_vnni": (16, "llvm.x86.avx512.vpdpbusd.512"),
    "dotprod": (4, "llvm.aarch64.neon.sdot.v4i32.v16i8"),
    # AVX-VNNI (VEX, AVX2 CPUs without AVX-512: Alder Lake and newer client cores): the same intrinsic on ymm,
    # which LLVM encodes as VEX without AVX-512VL. Picked by `int8_isa` (and `int4_dot.target_isa`), not `dot_isa`.
    "avxvnni": (8, "llvm.x86.avx512.vpdpbusd.256"),
}
#: Arm i8mm: the 2x8 by 8x2 int8 matrix multiply-accumulate (not a broadcast dot product: not in DOT_ISAS,
#: which edgecc.schedules.int4_dot also reads)
SMMLA = "llvm.aarch64.neon.smmla.v4i32.v16i8"


def dot_isa(features) -> str | None:
    """The int8 dot-product ISA a target's feature list offers (None: use the generic w8a8 kernel)."""
    features = set(features or ())
    if {"avx512_vnni", "avx512bw"} <= features:
        return "avx512_vnni"
    if "dotprod" in features:
        return "dotprod"
    return None


def target_dot_isa(target) -> str | None:
    """`dot_isa` for a TVM LLVM target (what LLVM says the target's CPU and -mattr have)."""
    if target is None or target.kind.name != "llvm":
        return None
    from tvm.target import codegen

    try:
        if codegen.target_has_features("avx512vnni", target) and codegen.target_has_features("avx512bw", target):
            return "avx512_vnni"
        if codegen.target_has_features("dotprod", target):
            return "dotprod"
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: no dot-product kernel
        return None
    return None


def int8_isa(features) -> str | None:
    """The w8a8 kernel for a feature list: "i8mm" (smmla, with sdot for single rows) or `dot_isa`'s."""
    features = set(features or ())
    if {"i8mm", "dotprod"} <= features:
        return "i8mm"
    isa = dot_isa(features)
    if isa is None and {"avx2", "avx_vnni"} <= features:
        return "avxvnni"
    return isa


def target_int8_isa(target) -> str | None:
    """`int8_isa` for a TVM LLVM target: "i8mm" when LLVM says it has both i8mm and dotprod, "avxvnni" for
    AVX2 + AVX-VNNI without AVX-512 VNNI."""
    isa = target_dot_isa(target)
    if isa not in ("dotprod", None) or target is None or target.kind.name != "llvm":
        return isa
    from tvm.target import codegen

    try:
        if isa == "dotprod":
            return "i8mm" if codegen.target_has_features("i8mm", target) else isa
        if codegen.target_has_features("avxvnni", target) and codegen.target_has_features("avx2", target):
            return "avxvnni"
    except Exception:  # noqa: BLE001 - as target_dot_isa: keep what LLVM could describe
        return isa
    return isa


def supports(isa: str | None, n: int, tile: int) -> bool:
    """Whether the kernel covers an [*, n] output stored in column tiles of `tile`."""
    if isa == "i8mm":
        return n % tile == 0  # any tile: a partial group of 4 columns goes through a padded copy
    return isa in DOT_ISAS and n % tile == 0 and tile % DOT_ISAS[isa][0] == 0


def pack_k4(codes: np.ndarray, tile: int) -> np.ndarray:
    """int8 codes [K, N] -> [N / tile, ceil(K / 4), tile * 4]: tile-major, 4 k values per column adjacent."""
    k, n = codes.shape
    k4 = -(-k // 4)
    padded = np.zeros((k4 * 4, n), dtype=np.int8)
    padded[:k] = codes
    # [K4, 4, NT, T] -> [NT, K4, T, 4]
    out = padded.reshape(k4, 4, n // tile, tile).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(out).reshape(n // tile, k4, tile * 4)


def unpack_k4(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `pack_k4` -> int8 codes [K, N]."""
    nt, k4, t4 = packed.shape
    tile = t4 // 4
    codes = packed.reshape(nt, k4, tile, 4).transpose(1, 3, 0, 2).reshape(k4 * 4, nt * tile)
    return np.ascontiguousarray(codes[:k])


def _register_tile(isa: str, tile: int, rows_hint) -> tuple[int, int]:
    """(mr rows, vb column vectors) per register tile: accumulators mr * vb within the register file."""
    lanes = DOT_ISAS[isa][0]
    nvec = tile // lanes
    # AVX-512 / NEON: 4 x 4 accumulators + 4 weight vectors + 1 broadcast in 32 registers; AVX2 has 16: 4 x 2
    vb = next(v for v in ((2, 1) if isa == "avxvnni" else (4, 2, 1)) if nvec % v == 0)
    single_row = isinstance(rows_hint, int) and rows_hint == 1
    mr = 1 if single_row else 4
    return mr, vb


def int8_dot_matmul_kernel(k: int, n: int, tile: int, isa: str, rows=None) -> tirx.PrimFunc:
    """y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * code[k, n]; x float32 [m, K] (m symbolic), weights as
    `pack_k4` stores them, scales [N / tile, 1, tile] (tile-major, one group), y float32 [m, N].
    `isa`: a DOT_ISAS key or "i8mm" (`int8_isa`)."""
    if isa == "i8mm":
        return _i8mm_matmul_kernel(k, n, tile, rows)
    from tvm.script import tirx as T

    lanes, intrin = DOT_ISAS[isa]
    x86 = isa in ("avx512_vnni", "avxvnni")
    mr, vb = _register_tile(isa, tile, rows)
    k4 = -(-k // 4)
    jobs_per_tile = tile // (lanes * vb)
    K, N, K4, KP = T.int64(k), T.int64(n), T.int64(k4), T.int64(k4 * 4)
    NT, TT, MR, VB, LN = T.int64(n // tile), T.int64(tile), T.int64(mr), T.int64(vb), T.int64(lanes)
    JT = T.int64(jobs_per_tile)
    vec = f"int32x{lanes}"
    bytes_vec = f"int8x{lanes * 4}"
    flip = T.int32(-2139062144)  # 0x80808080: code XOR 0x80 per byte = code + 128 as unsigned
    CORR = T.int32(128 if x86 else 0)  # x86: the unsigned operand's +128 adds 128 * sum_k xq[m, k]

    def weights(wi, t, kk, c0):
        w = wi[t, kk, T.ramp(c0, T.int64(1), lanes)]
        if x86:
            w = T.bitwise_xor(w, T.broadcast(flip, lanes))
        return T.reinterpret(bytes_vec, w)  # LLVM 17+: both dot operands are byte vectors

    def acts(xqi, i, kk):
        return T.reinterpret(bytes_vec, T.broadcast(xqi[i, kk], lanes))

    @T.prim_func(private=True)
    def int8_dot_matmul(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                     "edgecc.schedule": SCHEDULE_NAME})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        w = T.match_buffer(w_h, (NT, K4, TT * T.int64(4)), "int8")
        s = T.match_buffer(s_h, (NT, T.int64(1), TT), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        wi = T.decl_buffer((NT, K4, TT), "int32", data=w.data)  # a column's 4 codes as one int32
        xq = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, KP), "int8")
        xqi = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR, K4), "int32", data=xq.data)
        sx = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR,), "float32")
        xs = T.decl_buffer(((m + MR - T.int64(1)) // MR * MR,), "int32")
        # 1. rows of x -> int8 codes, their scale and (x86) their sum; padding rows and columns are zeros
        for i in T.parallel((m + MR - T.int64(1)) // MR * MR):
            amax = T.decl_buffer((1,), "float32", scope="local")
            tot = T.decl_buffer((1,), "int32", scope="local")
            amax[0] = T.float32(0)
            tot[0] = 0
            if i < m:
                for c in range(K):
                    amax[0] = T.max(amax[0], T.fabs(x[i, c]))
                sx[i] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
                for c in range(K):
                    xq[i, c] = T.Cast("int8", T.max(T.min(T.round(x[i, c] / sx[i]), T.float32(127)),
                                                    T.float32(-127)))
                    tot[0] = tot[0] + T.Cast("int32", xq[i, c])
                for c in range(KP - K):
                    xq[i, K + c] = T.int8(0)
            else:
                sx[i] = T.float32(0)
                for c in range(KP):
                    xq[i, c] = T.int8(0)
            xs[i] = tot[0] * CORR
        # 2. register tiles: mr rows x vb vectors of `lanes` columns, int32 sums over K / 4 dot steps
        for job in T.parallel(NT * JT):
            acc = T.decl_buffer((MR, VB * LN), "int32", scope="local")
            for ib in range((m + MR - T.int64(1)) // MR):
                for r in T.unroll(MR):
                    for v in T.unroll(VB * LN):
                        acc[r, v] = 0
                for kk in range(K4):
                    for r in T.unroll(MR):
                        for v in T.unroll(VB):
                            acc[r, T.ramp(v * LN, T.int64(1), lanes)] = T.call_llvm_pure_intrin(
                                vec, intrin, acc[r, T.ramp(v * LN, T.int64(1), lanes)],
                                weights(wi, job // JT, kk, job % JT * VB * LN + v * LN),
                                acts(xqi, ib * MR + r, kk))
                for r in range(MR):
                    if ib * MR + r < m:
                        for v in T.vectorized(VB * LN):
                            y[ib * MR + r, job // JT * TT + job % JT * VB * LN + v] = (
                                T.Cast("float32", acc[r, v] - xs[ib * MR + r]) * sx[ib * MR + r]
                                * s[job // JT, 0, job % JT * VB * LN + v])

    return int8_dot_matmul


def _i8mm_register_tile(tile: int, rows_hint) -> tuple[int, int]:
    """(mp row pairs, vb groups of 4 columns) per `smmla` register tile: mp * vb * 2 accumulators, vb * 2
    zipped weight operands and mp activation operands within NEON's 32 registers."""
    quads = -(-tile // 4)
    if isinstance(rows_hint, int) and rows_hint >= 8:
        mp, prefer = 4, (2, 1)  # 16 accumulators; fewer weight loads + zips per smmla than 2 x 4
    elif isinstance(rows_hint, int) and rows_hint <= 2:
        mp, prefer = 1, (4, 2, 1)
    else:
        mp, prefer = 2, (4, 2, 1)
    return mp, next(v for v in prefer if quads % v == 0)


def _i8mm_matmul_kernel(k: int, n: int, tile: int, rows=None) -> tirx.PrimFunc:
    """The `smmla` kernel (module docstring); same signature and storage as `int8_dot_matmul_kernel`."""
    from tvm.script import tirx as T

    smmla, sdot = SMMLA, DOT_ISAS["dotprod"][1]
    mp, vb = _i8mm_register_tile(tile, rows)
    k4 = -(-k // 4)
    k8 = -(-k4 // 2)
    quads = -(-tile // 4)
    pad = tile % 4 != 0  # static: copy the weights into whole groups of 4 columns
    odd = k4 % 2 == 1  # static: the last k8 step has only its lower 4 k
    K, N, K4, K8, KP = T.int64(k), T.int64(n), T.int64(k4), T.int64(k8), T.int64(k8 * 8)
    NT, TT, QW = T.int64(n // tile), T.int64(tile), T.int64(quads * 4)
    MP, MR, VB, JT = T.int64(mp), T.int64(2 * mp), T.int64(vb), T.int64(quads // vb)
    HALF = T.int64(k4 // 2)
    one = T.int64(1)

    def cols4(ws, t, kk, c0):  # 4 columns x 4 k as one int32 per column
        return ws[t, kk, T.ramp(c0, one, 4)]

    def b_op(ws, t, k2, c0, h: int, last: bool = False):
        """smmla's right operand for columns (c0 + 2h, c0 + 2h + 1) x 8 k: zip of k4 rows 2*k2 and 2*k2 + 1."""
        lo = cols4(ws, t, k2 * T.int64(2), c0)
        hi = T.broadcast(T.int32(0), 4) if last else cols4(ws, t, k2 * T.int64(2) + one, c0)
        return T.reinterpret("int8x16", T.Shuffle([lo, hi], [2 * h, 4 + 2 * h, 2 * h + 1, 5 + 2 * h]))

    def sdot_step(acc1, ws, t, kk, c0, xk4, v):  # 4 columns x 4 k against the row's 4 k, broadcast
        return T.call_llvm_pure_intrin("int32x4", sdot, acc1[T.ramp(v * T.int64(4), one, 4)],
                                       T.reinterpret("int8x16", cols4(ws, t, kk, c0)),
                                       T.reinterpret("int8x16", T.broadcast(xk4, 4)))

    def a_op(xa, p, k2):  # rows (2p, 2p + 1) x 8 k
        return xa[p, k2, T.ramp(T.int64(0), one, 16)]

    @T.prim_func(private=True)
    def int8_mmla_matmul(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE,
                     "edgecc.schedule": SCHEDULE_NAME})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        w = T.match_buffer(w_h, (NT, K4, TT * T.int64(4)), "int8")
        s = T.match_buffer(s_h, (NT, T.int64(1), TT), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        wi = T.decl_buffer((NT, K4, TT), "int32", data=w.data)  # a column's 4 codes as one int32
        ws = T.decl_buffer((NT, K4, QW), "int32", data=(None if pad else w.data))
        # activations: element (i, c) at [i // 2, c // 8, (i % 2) * 8 + c % 8], zero-padded
        xa = T.decl_buffer(((m + MR - one) // MR * MP, K8, T.int64(16)), "int8")
        xai = T.decl_buffer(((m + MR - one) // MR * MP, K8, T.int64(4)), "int32", data=xa.data)
        sx = T.decl_buffer(((m + MR - one) // MR * MR,), "float32")
        if pad:
            for t in T.parallel(NT):
                for kk, c in T.grid(K4, QW):
                    if c < TT:
                        ws[t, kk, c] = wi[t, kk, c]
                    else:
                        ws[t, kk, c] = 0
        # 1. rows of x -> int8 codes and their scale; padding rows and k are zeros
        for i in T.parallel((m + MR - one) // MR * MR):
            amax = T.decl_buffer((1,), "float32", scope="local")
            amax[0] = T.float32(0)
            if i < m:
                for c in range(K):
                    amax[0] = T.max(amax[0], T.fabs(x[i, c]))
                sx[i] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
                for c in range(K):
                    xa[i // T.int64(2), c // T.int64(8), i % T.int64(2) * T.int64(8) + c % T.int64(8)] = T.Cast(
                        "int8", T.max(T.min(T.round(x[i, c] / sx[i]), T.float32(127)), T.float32(-127)))
                for c in range(KP - K):
                    xa[i // T.int64(2), (K + c) // T.int64(8), i % T.int64(2) * T.int64(8) + (K + c) % T.int64(8)] = \
                        T.int8(0)
            else:
                sx[i] = T.float32(0)
                for c in range(KP):
                    xa[i // T.int64(2), c // T.int64(8), i % T.int64(2) * T.int64(8) + c % T.int64(8)] = T.int8(0)
        # 2. per job: vb groups of 4 columns of one tile
        for job in T.parallel(NT * JT):
            if m == one:
                # decode: sdot, the row's 4 k broadcast against 4 columns x 4 k
                acc1 = T.decl_buffer((VB * T.int64(4),), "int32", scope="local")
                for v in T.unroll(VB * T.int64(4)):
                    acc1[v] = 0
                for k2 in range(HALF):  # two k4 steps per k8 block of the row's codes
                    for h in T.unroll(2):
                        for v in T.unroll(VB):
                            acc1[T.ramp(v * T.int64(4), one, 4)] = sdot_step(
                                acc1, ws, job // JT, k2 * T.int64(2) + h, job % JT * VB * T.int64(4) + v * T.int64(4),
                                xai[0, k2, h], v)
                if odd:
                    for v in T.unroll(VB):
                        acc1[T.ramp(v * T.int64(4), one, 4)] = sdot_step(
                            acc1, ws, job // JT, K4 - one, job % JT * VB * T.int64(4) + v * T.int64(4),
                            xai[0, HALF, 0], v)
                for v in T.unroll(VB * T.int64(4)):
                    if job % JT * VB * T.int64(4) + v < TT:
                        y[0, job // JT * TT + job % JT * VB * T.int64(4) + v] = (
                            T.Cast("float32", acc1[v]) * sx[0] * s[job // JT, 0, job % JT * VB * T.int64(4) + v])
            else:
                # smmla: mp row pairs x vb * 2 column pairs, 2 x 2 int32 lanes each (row-major in the lanes)
                acc = T.decl_buffer((MP, VB * T.int64(8)), "int32", scope="local")
                for ib in range((m + MR - one) // MR):
                    for p, v in T.grid(MP, VB * T.int64(8)):
                        acc[p, v] = 0
                    for k2 in range(HALF):
                        for v in T.unroll(VB):
                            for p in T.unroll(MP):
                                acc[p, T.ramp(v * T.int64(8), one, 4)] = T.call_llvm_pure_intrin(
                                    "int32x4", smmla, acc[p, T.ramp(v * T.int64(8), one, 4)],
                                    a_op(xa, ib * MP + p, k2),
                                    b_op(ws, job // JT, k2, job % JT * VB * T.int64(4) + v * T.int64(4), 0))
                                acc[p, T.ramp(v * T.int64(8) + T.int64(4), one, 4)] = T.call_llvm_pure_intrin(
                                    "int32x4", smmla, acc[p, T.ramp(v * T.int64(8) + T.int64(4), one, 4)],
                                    a_op(xa, ib * MP + p, k2),
                                    b_op(ws, job // JT, k2, job % JT * VB * T.int64(4) + v * T.int64(4), 1))
                    if odd:
                        for v in T.unroll(VB):
                            for p in T.unroll(MP):
                                acc[p, T.ramp(v * T.int64(8), one, 4)] = T.call_llvm_pure_intrin(
                                    "int32x4", smmla, acc[p, T.ramp(v * T.int64(8), one, 4)],
                                    a_op(xa, ib * MP + p, HALF),
                                    b_op(ws, job // JT, HALF, job % JT * VB * T.int64(4) + v * T.int64(4), 0, True))
                                acc[p, T.ramp(v * T.int64(8) + T.int64(4), one, 4)] = T.call_llvm_pure_intrin(
                                    "int32x4", smmla, acc[p, T.ramp(v * T.int64(8) + T.int64(4), one, 4)],
                                    a_op(xa, ib * MP + p, HALF),
                                    b_op(ws, job // JT, HALF, job % JT * VB * T.int64(4) + v * T.int64(4), 1, True))
                    # lane r * 2 + l of column pair j: row 2p + r, column 2j + l
                    for p in T.unroll(MP):
                        for r in T.unroll(2):
                            if ib * MR + p * T.int64(2) + r < m:
                                for j in T.unroll(VB * T.int64(2)):
                                    for l in T.unroll(2):
                                        if job % JT * VB * T.int64(4) + j * T.int64(2) + l < TT:
                                            y[ib * MR + p * T.int64(2) + r,
                                              job // JT * TT + job % JT * VB * T.int64(4) + j * T.int64(2) + l] = (
                                                T.Cast("float32", acc[p, j * T.int64(4) + r * T.int64(2) + l])
                                                * sx[ib * MR + p * T.int64(2) + r]
                                                * s[job // JT, 0, job % JT * VB * T.int64(4) + j * T.int64(2) + l])

    return int8_mmla_matmul
