"""Float GEMV over column-panel weights, hand-written so it can prefetch (rule `panel_gemv`).

`edgecc.ir_passes.pack_gemv_weights` turns a build's matrix-vector products into
``einsum("mk,pkj->mpj", x, Wp)`` over weights stored as column panels `Wp [N / nr, K, nr]`: each task streams
one contiguous block from DRAM. The register-tile template (`contraction.py`) schedules that einsum well, but
TIR's schedule primitives cannot emit a software prefetch, and one core's hardware prefetcher alone does not
keep enough of a stream in flight: one 768x3072 GEMV with its weights coming from DRAM ran at 25.3 GB/s as
scheduled and 26.2 GB/s with a prefetch 16 panel rows ahead (2 threads, this machine). So this rule replaces
exactly that einsum (nothing fused into it: FuseOps does not fuse an einsum's consumers) with the same loop
nest written out, plus `llvm.prefetch` of every cache line `PREFETCH_BYTES` ahead in the task's own panel,
the way `int4_dot.py` does for 4-bit weights. `EDGECC_PANEL_GEMV=0` leaves the einsum to the template.

The accumulators are one vector-typed element each (`float32x16`), which LLVM keeps in registers; the
prefetch call makes it store them back every iteration (it may read any memory, and TVM's per-buffer alias
metadata does not cover the call), a few L1 stores per 256-byte panel row.

Loop nest (all static shapes): panels in parallel; per panel an `m x nr` accumulator in vector registers
(m <= `gemv_max_rows`, nr = whole vectors); for each k the m activations are broadcast against one panel row.
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, tirx

from edgecc.schedules import base
from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec

SCHEDULE_NAME = "panel_gemv"
#: how far ahead of its loads a task prefetches its panel (int4_dot.py uses the same distance)
PREFETCH_BYTES = 4096
_CACHE_LINE = 64


def panel_gemv_kernel(m: int, k: int, panels: int, nr: int, lanes: int, dtype: str = "float32") -> tirx.PrimFunc:
    """y[m, p, j] = sum_k x[m, k] * w[p, k, j] with a software prefetch; the einsum's own signature."""
    from tvm.script import tirx as T

    bits = tvm.runtime.DataType(dtype).bits
    vb = nr // lanes
    lines = max(1, nr * bits // 8 // _CACHE_LINE)  # cache lines per panel row
    per_line = _CACHE_LINE * 8 // bits  # elements per cache line
    ahead = max(1, PREFETCH_BYTES // (nr * bits // 8))  # panel rows
    M, K, P, NR, LN, VB = (T.int64(v) for v in (m, k, panels, nr, lanes, vb))
    AHEAD, PL = T.int64(ahead), T.int64(per_line)

    vdtype = f"{dtype}x{lanes}"
    steady = k - ahead  # k rows whose prefetch stays inside the task's own panel: no clamp in the loop

    @T.macro
    def row(p, kk, acc, x, wf):
        for v in T.unroll(VB):
            for r in T.unroll(M):
                acc[r * VB + v] = acc[r * VB + v] + T.broadcast(x[r, kk], lanes) * wf[
                    T.ramp((p * K + kk) * NR + v * LN, T.int64(1), lanes)]

    @T.prim_func(private=True)
    def panel_gemv(x: T.Buffer((M, K), dtype), w: T.Buffer((P, K, NR), dtype), y: T.Buffer((M, P, NR), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "edgecc.schedule": SCHEDULE_NAME})
        wf = T.decl_buffer((P * K * NR,), dtype, data=w.data)
        for p in T.parallel(P):
            # one vector-typed element per accumulator: LLVM keeps them in registers
            acc = T.decl_buffer((M * VB,), vdtype, scope="local")
            for a in T.unroll(M * VB):
                acc[a] = T.broadcast(T.Cast(dtype, 0), lanes)
            for kk in range(T.int64(max(steady, 0))):
                for line in T.unroll(T.int64(lines)):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        wf[(p * K + kk + AHEAD) * NR + line * PL]), T.int32(0), T.int32(3), T.int32(1)))
                row(p, kk, acc, x, wf)
            for kt in range(T.int64(min(ahead, k))):
                row(p, T.int64(max(steady, 0)) + kt, acc, x, wf)
            for r in T.unroll(M):
                for v in T.unroll(VB):
                    y[r, p, T.ramp(v * LN, T.int64(1), lanes)] = acc[r * VB + v]

    return panel_gemv


def _static(shape) -> list[int] | None:
    out = []
    for d in shape:
        if not isinstance(d, (tirx.IntImm, int)):
            return None
        out.append(int(d))
    return out


def match_panel_einsum(func: tirx.PrimFunc) -> tuple[int, int, int, int, str] | None:
    """(m, k, panels, nr, dtype) when `func` is exactly the panel GEMV einsum of `pack_gemv_weights`."""
    if len(func.params) != 3:
        return None
    bufs = list(func.params)  # TVM 0.27: a PrimFunc's parameters are its buffers
    if any(getattr(b, "shape", None) is None for b in bufs):
        return None
    xb, wb, yb = bufs
    xs, ws, ys = _static(xb.shape), _static(wb.shape), _static(yb.shape)
    if xs is None or ws is None or ys is None or len(xs) != 2 or len(ws) != 3 or len(ys) != 3:
        return None
    m, k = xs
    panels, k2, nr = ws
    if k2 != k or ys != [m, panels, nr] or not (str(xb.dtype) == str(wb.dtype) == str(yb.dtype)):
        return None
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = base.top_blocks(sch)
    if len(blocks) != 1 or not base.is_reduction_block(sch, blocks[0]):
        return None
    block = sch.get(blocks[0])
    ivs = [iv.var for iv in block.iter_vars]
    if len(ivs) != 4:
        return None
    i, pv, j, kv = ivs
    store = block.body
    value = getattr(store, "value", None)
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)):
        return None
    acc, (a, b) = value.a, (value.b.a, value.b.b)

    def same(load, buf, idx) -> bool:
        return (isinstance(load, base.LoadNode) and load.source.same_as(buf) and len(load.indices) == len(idx)
                and all(x.same_as(y) for x, y in zip(load.indices, idx)))

    if not (same(acc, yb, [i, pv, j]) and same(a, xb, [i, kv]) and same(b, wb, [pv, kv, j])):
        return None
    if not store.buffer.same_as(yb):
        return None
    return m, k, panels, nr, str(xb.dtype)


class PanelGemv(base.ScheduleRule):
    """The panel-weight GEMV einsum of `pack_gemv_weights`, replaced by `panel_gemv_kernel`."""

    name = SCHEDULE_NAME

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        if os.environ.get("EDGECC_PANEL_GEMV") == "0":  # A/B timing against the template's schedule
            return None
        found = match_panel_einsum(sch.mod["main"])
        if found is None:
            return None
        m, k, panels, nr, dtype = found
        bits = tvm.runtime.DataType(dtype).bits
        lanes = params.lanes(bits)
        if not dtype.startswith("float") or m > params.gemv_max_rows or nr % lanes:
            return None
        return panel_gemv_kernel(m, k, panels, nr, lanes, dtype)
