"""Tile sizes and other schedule knobs, derived from a `TargetSpec` (no magic numbers in the rules).

Everything the rules choose comes from here: the register tile of the matmul/conv micro-kernel (rows x
vectors, sized so the accumulators fill about half of the vector register file), the GEMV tile width,
how many iterations a parallel loop should have per core, and the widest loop that is fully unrolled.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecc.targets.registry import TargetSpec


@dataclass(frozen=True)
class CpuParams:
    """Schedule knobs for one CPU target."""

    vector_bits: int  # width of one SIMD register
    vector_regs: int  # architectural vector registers (x86 AVX-512 / AArch64 / RVV: 32, AVX2/SSE: 16)
    mr: int  # rows of the register tile (unrolled; each row is one broadcast operand)
    nr_vecs: int  # vectors per row of the register tile
    gemv_nr_vecs: int  # vectors per tile for matrix-vector products (M == 1): memory-bound, wide tiles
    gemv_max_rows: int  # at most this many output rows counts as a GEMV (no weight packing)
    pack_min_rows: int  # pack the vector operand into panels when the output has at least this many rows
    pack_min_stride_bytes: int  # ... and its rows are at least this long (cache-set aliasing, TLB) or not
    # contiguous along v (2 KiB: GPT's 768..3072-wide weights are packed; 128-wide attention operands not)
    num_cores: int  # threads the runtime is expected to use
    min_parallel_tasks_per_core: int  # fuse outer loops until a parallel loop has this many tasks per core
    max_unroll: int  # fully unroll inner loops up to this extent (reductions, epilogues)
    # K-blocked convolutions (`contraction._k_chunk`): a chunk of a packed panel, and the largest panel output
    # (the accumulator kept in L1 across chunks); together with the input rows they fit a 32-48 KiB L1d
    kblock_chunk_bytes: int = 16 * 1024
    kblock_acc_bytes: int = 32 * 1024
    # ... and how many chunks ahead their weights are prefetched (0: not at all; `prefetch.py`)
    kblock_prefetch_ahead: int = 1
    # ... and whether their input's next chunk is prefetched too (`contraction._input_chunk_plan`)
    kblock_prefetch_input: bool = True
    # GEMMs that pack V per panel prefetch the next panel's V columns, residual and output lines
    # (`contraction._next_panel_plans`)
    panel_prefetch: int = 3  # bit 1: V's next columns, bit 2: the epilogue's residual and output lines
    prefetch_max_lines: int = 64  # ... at most this many prefetches per row tile, else that plan is dropped

    @property
    def max_rows(self) -> int:
        """The most rows a register tile can have: its accumulators, the row's vectors of the panel and the
        broadcasts LLVM keeps live (a conv reuses each input element across the window's taps: up to about 8)
        all in registers (32 registers, 2 vectors a row: 11). 3x3 convs 64 -> 64 measured 24 rows (12 x 2
        vectors) 1.10x and 26 rows 1.16x the time of 8 and 7 (in-process A/B, AVX-512); 22 rows (11 x 2)
        ran 0.94x the time of 8."""
        return max(self.mr, (self.vector_regs - self.nr_vecs - 8) // self.nr_vecs)

    def lanes(self, dtype_bits: int = 32) -> int:
        """Elements of `dtype_bits` in one vector register."""
        return max(1, self.vector_bits // dtype_bits)

    def nr(self, dtype_bits: int = 32) -> int:
        """Width (elements) of the register tile of the GEMM micro-kernel."""
        return self.nr_vecs * self.lanes(dtype_bits)

    def gemv_nr(self, dtype_bits: int = 32) -> int:
        return self.gemv_nr_vecs * self.lanes(dtype_bits)

    @property
    def min_parallel_tasks(self) -> int:
        return max(1, self.num_cores) * self.min_parallel_tasks_per_core


def _vector_regs(spec: TargetSpec) -> int:
    if spec.arch == "x86_64":
        return 32 if ("avx512f" in spec.features or spec.vector_bits >= 512) else 16
    if spec.arch in ("aarch64", "riscv64"):
        return 32
    return 16


# Register tile (mr rows x nr_vecs vectors) per register-file size. 32 registers: 8 x 2 = 16 accumulators
# + 2 B vectors + broadcasts; 16 registers: 6 x 2 = 12 accumulators (the classic Haswell sgemm kernel).
_TILE_BY_REGS = {32: (8, 2), 16: (6, 2)}


def cpu_params(spec: TargetSpec) -> CpuParams:
    """The knobs for `spec` (a CPU target)."""
    regs = _vector_regs(spec)
    mr, nr_vecs = _TILE_BY_REGS.get(regs, (4, 2))
    return CpuParams(
        vector_bits=max(32, spec.vector_bits),
        vector_regs=regs,
        mr=mr,
        nr_vecs=nr_vecs,
        gemv_nr_vecs=4,
        gemv_max_rows=4,
        pack_min_rows=16,
        pack_min_stride_bytes=2048,
        num_cores=max(1, spec.num_cores),
        min_parallel_tasks_per_core=4,
        max_unroll=16,
    )
