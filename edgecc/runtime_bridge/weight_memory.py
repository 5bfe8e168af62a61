"""Weights in one block of transparent huge pages, handed to TVM without a copy.

Why: a decode step streams every weight once (GPT-2-style 6 x d768: 195 MB; SmolLM2 w4: ~90 MB). In 4 KiB
pages that is ~50,000 TLB misses per step, and a GEMV tile that walks a [K, N] weight row by row touches a
new page on almost every row. `tvm.runtime.tensor` allocates with `posix_memalign`, which on Linux gets
huge pages only when the system-wide THP mode is `always`; most distributions (and this machine) ship
`madvise`. Here all weights of an artifact are copied into one anonymous mapping that is `madvise`d
MADV_HUGEPAGE *before* it is touched, so the kernel backs it with 2 MiB pages from the first write, and each
weight becomes a zero-copy `tvm.runtime.Tensor` view of it (DLPack). Measured on the GPT-2-style decode step
(2 threads, load ~0.5, 0.2 s pause before each step, `EDGECC_HUGEPAGES=0` vs 1): 14.6 -> 13.7 ms (docs/status.md).

Falls back to ordinary TVM tensors where this does not apply (no `mmap.MADV_HUGEPAGE`: macOS, Windows; a
device other than the CPU), or when `EDGECC_HUGEPAGES=0`. The C API (`runtime_bridge/capi`) does the same
with `posix_memalign` + `madvise`.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

ALIGN = 64  # what the compiled kernels assume for every buffer
HUGE_PAGE = 2 << 20


def _enabled() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("EDGECC_HUGEPAGES", "1") != "0"


class WeightArena:
    """Owns the mapping; `tensors` are TVM views into it (keep the arena alive as long as they are used)."""

    def __init__(self, arrays: list[np.ndarray], dev):
        import tvm

        self.huge_pages = False
        self._map = None
        if dev.dlpack_device_type() != tvm.cpu().dlpack_device_type() or not _enabled() or not arrays:
            self.tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
            return
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += (a.nbytes + ALIGN - 1) // ALIGN * ALIGN
        total = max(HUGE_PAGE, (total + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE)
        self._map = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
            self.huge_pages = True
        except OSError:  # THP disabled ("never") or not supported by the kernel: ordinary pages, same layout
            pass
        self.tensors = []
        for a, off in zip(arrays, offsets):
            a = np.require(a, requirements="C")
            view = np.frombuffer(self._map, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
            view[...] = a
            self.tensors.append(tvm.runtime.from_dlpack(view))


def load_weights(arrays: list[np.ndarray], dev) -> WeightArena:
    """The artifact's weights as TVM tensors on `dev`, in huge pages where the OS allows it."""
    return WeightArena(arrays, dev)
