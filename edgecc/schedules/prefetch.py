"""Software prefetch in scheduled kernels: the next chunk of a packed weight panel, fetched while this one works.

TIR's schedule primitives cannot issue a prefetch, and the hardware prefetchers do not help where a kernel
re-reads a small chunk of a weight stream many times (a K-blocked convolution walks every row tile of its
output over one ~16 KiB chunk of the packed panel before the next): the first row tile of each chunk waits
on DRAM, the others hit L1. Measured on ResNet-50's layer-4 shape (3x3, 512 channels, 7x7 output, 2
threads), one conv ran 1.15 ms with its weights warm and 1.64 ms in a chain of such convs whose weights come
from memory. So the schedule leaves a plan (`ChunkPrefetch`) and `insert_chunk_prefetch` adds, at the start
of each row tile, prefetches of its share of the next chunk (into L2): spread over the chunk's row tiles,
the next chunk is in cache when its turn comes. The panels are contiguous, so "the next chunk" after a
panel's last one is the next panel's first (the same task's, with static parallel ranges).

Measured (a chain of 6-8 equal convs, the build with and without, alternating in one process, 2 threads):
3x3 512 ch 7x7 0.77-0.81x, 1x1 2048 ch 7x7 0.85-0.87x, 1x1 1024 ch 14x14 0.95x, 3x3 256 ch 14x14 0.95x.
One prefetch per step of the reduction instead (one line per k-step for a 1x1 conv) was 1.6-1.8x SLOWER on
the 1x1 convs: the address arithmetic sat in the micro-kernel's loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm_ffi
from tvm import tirx

log = logging.getLogger(__name__)

#: LLVM's prefetch locality: 3 = all cache levels (prefetcht0), 2 = L2 and out (prefetcht1)
LOCALITY_L1, LOCALITY_L2 = 3, 2
CACHE_LINE_BYTES = 64


def prefetch(load, locality: int = LOCALITY_L1, write: bool = False):
    """`llvm.prefetch` (read or write, data) of the address of the buffer element `load`, e.g. for TVMScript
    kernels `T.evaluate(prefetch(buf[i]))`."""
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(load), tirx.IntImm("int32", int(write)),
                                 tirx.IntImm("int32", locality), tirx.IntImm("int32", 1))


@dataclass
class ChunkPrefetch:
    """Where and what to prefetch in a blocked contraction (built by `contraction.schedule`).

    `loop_var`: the innermost row-tile loop; each row tile is one `step` (an expression of the loop vars,
    0 .. `steps` - 1) and prefetches `lines_per_step` cache lines of the chunk `ahead` chunks after the one
    that starts at element `chunk_start` (an expression) of `buffer` (flat). A chunk is contiguous, or, with
    `row_stride`, `chunk_elems // row_elems` rows of `row_elems` contiguous elements `row_stride` apart (a
    column panel of a row-major matrix); consecutive chunks are `advance` elements apart (default: one chunk)."""

    buffer: tirx.Buffer
    loop_var: tirx.Var
    chunk_start: object
    chunk_elems: int
    step: object
    steps: int
    ahead: int = 1
    locality: int = LOCALITY_L2
    when: object = None  # a condition (expression of the loop vars) under which to prefetch; None: always
    row_elems: int = 0  # with row_stride: a strided chunk (see above)
    row_stride: int = 0
    advance: int = 0
    write: bool = False  # prefetch for writing (the epilogue's output lines)

    @property
    def elems_per_line(self) -> int:
        import tvm

        return max(1, CACHE_LINE_BYTES * 8 // tvm.runtime.DataType(str(self.buffer.dtype)).bits)

    @property
    def lines_per_row(self) -> int:
        """Cache lines of one contiguous row of the chunk (the whole chunk when it is contiguous)."""
        return -(-(self.row_elems if self.row_stride else self.chunk_elems) // self.elems_per_line)

    @property
    def chunk_lines(self) -> int:
        rows = self.chunk_elems // self.row_elems if self.row_stride else 1
        return rows * self.lines_per_row

    @property
    def lines_per_step(self) -> int:
        return -(-self.chunk_lines // self.steps)

    def line_offset(self, line):
        """Element offset of the chunk's cache line number `line` (an expression) from the chunk's start."""
        if not self.row_stride:
            return line * self.elems_per_line
        per_row = self.lines_per_row
        return (tirx.floordiv(line, per_row) * self.row_stride + tirx.floormod(line, per_row) * self.elems_per_line)


def insert_chunk_prefetch(func: tirx.PrimFunc, plan: ChunkPrefetch) -> tirx.PrimFunc:
    """`func` with the prefetches of `plan` at the top of the body of its loop `plan.loop_var`."""
    buf = plan.buffer
    total = 1
    for d in buf.shape:
        total *= int(d)
    idx_dtype = "int64"  # Relax's TIR indexes with int64 (TVM 0.27 exprs carry no `.dtype` to read it from)
    # the address of flat element `e`: buf[0, .., 0, e] (flattening is linear; a flat alias of the
    # parameter cannot be declared here: "DeclBuffer requires a physical data binding")
    zeros = [tirx.IntImm(idx_dtype, 0)] * (len(buf.shape) - 1)
    per_line = plan.elems_per_line
    chunk_lines = plan.chunk_lines
    last = tirx.IntImm(idx_dtype, max(0, total - per_line))
    found = []

    def _visit(stmt, mutator):
        if not stmt.loop_var.same_as(plan.loop_var):
            return mutator.default_mutate(stmt)
        found.append(stmt)
        stmts = []
        start = plan.chunk_start + tirx.IntImm(idx_dtype, plan.ahead * (plan.advance or plan.chunk_elems))
        for p in range(plan.lines_per_step):
            line = tirx.min(plan.step * plan.lines_per_step + p, chunk_lines - 1)
            addr = tirx.min(start + plan.line_offset(line), last)
            stmts.append(tirx.Evaluate(prefetch(tirx.BufferLoad(buf, zeros + [addr]), plan.locality, plan.write)))
        if plan.when is not None:
            stmts = [tirx.IfThenElse(plan.when, tirx.SeqStmt(stmts) if len(stmts) > 1 else stmts[0], None)]
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, tirx.SeqStmt(stmts + [stmt.body]),
                        stmt.thread_binding, stmt.annotations)

    body = tvm_ffi.structural_mutate(func.body, (tirx.For, _visit))
    if not found:
        raise ValueError("prefetch plan: its loop is not in the function")
    return func.with_body(body)


class PrefetchedSchedule:
    """A finished schedule and the prefetches to add to its function: what a `ScheduleRule.apply` returns when
    the schedule made plans (its `mod` is the scheduled module with the prefetches in)."""

    def __init__(self, sch, plans: list[ChunkPrefetch]):
        self.sch = sch
        self.plans = list(plans)

    @property
    def mod(self):
        import tvm

        func = self.sch.mod["main"]
        for plan in self.plans:
            try:
                func = insert_chunk_prefetch(func, plan)
            except Exception as exc:  # noqa: BLE001 - the kernel is right without its prefetches, only slower
                log.warning("software prefetch not added to a scheduled kernel: %s", exc)
        return tvm.IRModule({"main": func})
