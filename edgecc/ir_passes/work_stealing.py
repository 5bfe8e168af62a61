"""Work stealing for the parallel loops of CPU kernels: a TIR pass and the TIR pipeline that runs it.

TVM runs `for i in T.parallel(n)` as a static split: thread t of T gets iterations [t*S, (t+1)*S). When one
core is slower than the other (a shared cloud VM whose other hyperthread is busy; a phone's big.LITTLE
cores; an interrupt), every kernel waits for the slow one. Measured on this 2-core machine, the two threads
of one ResNet-50 run spent 46% and 41% of their time in kernels, with the busier thread changing from one
process to the next, and in-process A/B runs moved by up to 10% with the machine's state.

The pass rewrites each outermost parallel loop into

    shares = min(runtime.NumThreads(), MAX_SHARES, n)
    edgecc_parallel_init(ranges, shares, n)                # the same static split as before
    for w in T.parallel(shares):                           # one share per thread
        while edgecc_parallel_claim(ranges, slot, w, shares, chunk):
            for i in range(begin(slot), begin(slot) + count(slot)):
                <the loop body>

A thread works through its own share from the front, a quarter of what is left at a time (so it still reads
what it wrote in the previous kernel: partitions line up from kernel to kernel, which matters at 2 threads)
and, when done, takes half of what another share has left, from its back. The claim functions are plain C
(`runtime_bridge/native/edgecc_parallel.c`, a compare-and-swap on a packed [front, back) pair: TVM's LLVM
backend has no CPU atomics), compiled for the target and linked into the artifact
(`runtime_bridge/parallel_runtime.py`).

It runs after TVM's own lowering pipeline (loops are final: vectorized, unrolled, packed-API'd) and before
the host finalization that lowers `tvm_stack_alloca` and `call_packed`. Only builds that link the helper use
it (`tir_pipeline(spec)` names the pipeline for `relax.build`); `EDGECC_WORK_STEALING=0` turns it off (A/B).
"""

from __future__ import annotations

import os

import tvm
import tvm_ffi
from tvm import tirx

PIPELINE = "edgecc-work-stealing"
MAX_SHARES = 64  # ranges live on the caller's stack: one int64 per share
CHUNK = 1  # the smallest claim, in iterations (a claim takes a quarter of the share's rest, a steal half)


def enabled() -> bool:
    return os.environ.get("EDGECC_WORK_STEALING", "1") != "0"


# Architectures whose kernels keep TVM's static split. riscv64: qemu-riscv64 (the only way to run it here)
# aborts in its translator ("decode_save_opc: Assertion `ctx->insn_start != NULL'") on the tiny transformer's
# kernels once a claimed chunk runs more than one iteration; with no board to tell a qemu fault from a
# miscompile, riscv64 stays static.
STATIC_ARCHS = ("riscv64",)


def tir_pipeline(spec) -> str:
    """The `tir_pipeline` for `relax.build` of an artifact for `spec` (the caller links the helper object)."""
    stealing = spec.device == "cpu" and spec.arch not in STATIC_ARCHS and enabled()
    return PIPELINE if stealing else "default"


def _stack(n: int):
    return tirx.call_intrin("handle", "tirx.tvm_stack_alloca", "shape", n)


def _as(dtype: str, value):
    return value if dtype == "int32" else tirx.Cast(dtype, value)


def steal_loop(loop: tirx.For) -> tirx.Stmt:
    """The work-stealing form of one parallel loop (its body and loop variable unchanged)."""
    dtype = str(loop.loop_var.ty)
    n = loop.extent if str(loop.extent.ty) == "int32" else tirx.Cast("int32", loop.extent)
    ranges, slot = tirx.Var("steal_ranges", "handle"), tirx.Var("steal_slot", "handle")
    shares, w = tirx.Var("steal_shares", "int32"), tirx.Var("steal_w", "int32")
    begin, count = tirx.Var("steal_begin", "int32"), tirx.Var("steal_count", "int32")
    chunk = tirx.For(loop.loop_var, _as(dtype, begin), _as(dtype, count), tirx.ForKind.SERIAL, loop.body)
    claimed = tirx.SeqStmt([tirx.Bind(begin, tirx.call_extern("int32", "edgecc_parallel_begin", slot)),
                            tirx.Bind(count, tirx.call_extern("int32", "edgecc_parallel_count", slot)), chunk])
    claim = tirx.call_extern("int32", "edgecc_parallel_claim", ranges, slot, w, shares, CHUNK)
    per_thread = tirx.SeqStmt([tirx.Bind(slot, _stack(1)), tirx.While(claim != 0, claimed)])
    threads = tirx.Max(tirx.call_packed("runtime.NumThreads"), 1)
    return tirx.SeqStmt([
        tirx.Bind(shares, tirx.Min(tirx.Min(threads, MAX_SHARES), tirx.Max(n, 1))),
        tirx.Bind(ranges, _stack(MAX_SHARES)),
        tirx.Evaluate(tirx.call_extern("int32", "edgecc_parallel_init", ranges, shares, n)),
        tirx.For(w, 0, shares, tirx.ForKind.PARALLEL, per_thread),
    ])


def steal_parallel_loops(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with each outermost parallel loop in work-stealing form (loops of a constant extent < 2 kept)."""

    def visit(stmt, mutator):
        if stmt.kind != tirx.ForKind.PARALLEL:
            return mutator.default_mutate(stmt)
        if isinstance(stmt.extent, tirx.IntImm) and stmt.extent.value < 2:
            return stmt
        return steal_loop(stmt)  # parallel loops nested in it stay as they are (TVM runs them serially)

    return func.with_body(tvm_ffi.structural_mutate(func.body, (tirx.For, visit)))


@tvm.transform.module_pass(opt_level=0, name="EdgeccWorkStealing")
def work_stealing_pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
    updates = {gv: steal_parallel_loops(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _pipeline_factory(**kwargs):
    import tvm.s_tir  # noqa: F401 - registers the "s_tir" pipeline that "default" names
    from tvm.tirx import compilation_pipeline

    lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default", **kwargs)

    @tvm.transform.module_pass(opt_level=0, name="EdgeccTIRPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return work_stealing_pass(lower(mod))

    return _pipeline, finalize_host, finalize_device


def _register() -> None:
    from tvm.tirx import compilation_pipeline

    compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline_factory)


_register()
