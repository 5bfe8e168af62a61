"""w8a8 matmul on the CPU's int8 dot-product instructions: AVX-512 VNNI (`vpdpbusd`) and Arm dotprod (`sdot`).

Why a hand-written kernel: LLVM does not turn an int32 sum of int8 products written in TIR into dot-product
instructions, so the generic w8a8 path computes in fp32 (16 multiply-adds per AVX-512 instruction). One
`vpdpbusd` does 64 int8 multiply-adds, one `sdot` 16 — the reason llama.cpp and onnxruntime quantize
activations at all.

Weight layout (`pack_k4`, what params.bin holds for w8a8): the [K, N] int8 codes in column tiles of T
(`edgecc.compress.schemes.column_tile`), and inside a tile each column's 4 consecutive k values side by side:
element (k, c) is at ``[c // T, k // 4, (c % T) * 4 + k % 4]`` (K padded to a multiple of 4 with zeros). So
one 64-byte load is 16 columns x 4 k (one `vpdpbusd` operand) and one 16-byte load is 4 columns x 4 k (one
`sdot` operand), and a GEMV streams each tile's rows as one contiguous block.

Per call: each row of x is quantized to int8 (scale max|x| / 127, round, clamp to ±127 — the same grid as
the generic w8a8 kernel), then register tiles of `mr` rows x `vb` vectors of columns accumulate in int32 over
K/4 steps; the epilogue applies row scale x column scale. `vpdpbusd` multiplies unsigned by signed bytes:
the weights enter as unsigned (code XOR 0x80 = code + 128) and the activations as signed, and the extra
``128 * sum_k xq[m, k]`` is subtracted per row. Results are exact integer dot products times the two scales,
identical to the generic kernel's.
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
}


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


def supports(isa: str | None, n: int, tile: int) -> bool:
    """Whether the kernel covers an [*, n] output stored in column tiles of `tile`."""
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
    vb = next(v for v in (4, 2, 1) if nvec % v == 0)
    single_row = isinstance(rows_hint, int) and rows_hint == 1
    mr = 1 if single_row else 4  # 4 x 4 accumulators + 4 weight vectors + 1 broadcast: in 32 AVX-512 registers
    return mr, vb


def int8_dot_matmul_kernel(k: int, n: int, tile: int, isa: str, rows=None) -> tirx.PrimFunc:
    """y[m, n] = sx[m] * scale[n] * sum_k xq[m, k] * code[k, n]; x float32 [m, K] (m symbolic), weights as
    `pack_k4` stores them, scales [N / tile, 1, tile] (tile-major, one group), y float32 [m, N]."""
    from tvm.script import tirx as T

    lanes, intrin = DOT_ISAS[isa]
    x86 = isa == "avx512_vnni"
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
