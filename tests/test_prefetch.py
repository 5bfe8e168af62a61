"""Software prefetch of the next weight chunk (`edgecc.schedules.prefetch`): the IR before -> after (where the
prefetches go and which addresses they cover, evaluated for every loop iteration), the function still computes
the same numbers, and the K-blocked convolution over build-time panels gets them in a real build."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from edgecc.schedules.prefetch import LOCALITY_L2, ChunkPrefetch, insert_chunk_prefetch

P, KO, ROWS, K, NR = 4, 2, 3, 3, 16  # panels, chunks per panel, row tiles, steps per chunk, panel width


@T.prim_func
def _chunked(w: T.Buffer((P, KO * K, NR), "float32"), y: T.Buffer((P, ROWS, NR), "float32")):
    """A K-blocked nest: panel p, chunk ko, row tile r, step k of the chunk."""
    for p, ko, r, k, j in T.grid(P, KO, ROWS, K, NR):
        y[p, r, j] = y[p, r, j] + w[p, ko * K + k, j] * T.float32(r + 1)


def _loops(func) -> dict:
    loops = {}

    def visit(loop):
        loops.setdefault(loop.loop_var.name, loop)

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="pre")
    return loops


def _evaluate(expr, env: dict) -> int:
    """An integer expression of loop vars, evaluated (Add, Sub, Mul, Min, Max, Cast, IntImm, Var)."""
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return env[expr.name]
    if isinstance(expr, tirx.Cast):
        return _evaluate(expr.value, env)
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.Min: min, tirx.Max: max, tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b,
           tirx.EQ: lambda a, b: int(a == b)}
    for kind, fn in ops.items():
        if isinstance(expr, kind):
            return fn(_evaluate(expr.a, env), _evaluate(expr.b, env))
    raise TypeError(type(expr))


def _plan(func, ahead=1):
    loops = _loops(func)
    p, ko, r = (loops[n].loop_var for n in ("p", "ko", "r"))
    loads = []
    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.TensorLoad, loads.append), order="pre")
    (w,) = {ld.source.name: ld.source for ld in loads if ld.source.name == "w"}.values()
    chunk = K * NR
    return ChunkPrefetch(w, r, p * (KO * chunk) + ko * chunk, chunk, r, ROWS, ahead=ahead)


@pytest.mark.parametrize("ahead", [1, 2])
def test_prefetches_cover_the_next_chunk(ahead):
    """Before: no prefetch. After: each row tile's body starts with `lines_per_step` prefetches (L2), and over
    the row tiles of chunk (p, ko) they touch every cache line of the chunk `ahead` later (the next panel's
    first after a panel's last), nothing outside the buffer."""
    func = _chunked
    calls = []
    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.Call, calls.append), order="pre")
    assert not [c for c in calls if "prefetch" in str(c)]
    plan = _plan(func, ahead)
    after = insert_chunk_prefetch(func, plan)
    body = _loops(after)["r"].body
    assert isinstance(body, tirx.SeqStmt) and len(body.seq) == plan.lines_per_step + 1
    prefetches = list(body.seq)[:-1]
    assert isinstance(list(body.seq)[-1], tirx.For)  # the reduction, as before
    total = P * KO * K * NR
    per_line = 64 // 4
    for p in range(P):
        for ko in range(KO):
            got = set()
            for r in range(ROWS):
                for stmt in prefetches:
                    call = stmt.value
                    assert "llvm.prefetch" in str(call)
                    assert int(call.args[-2].value) == LOCALITY_L2
                    load = call.args[1].args[0]  # address_of(w[0, 0, e])
                    assert [int(i) for i in load.indices[:-1]] == [0, 0]
                    e = _evaluate(load.indices[-1], {"p": p, "ko": ko, "r": r})
                    assert 0 <= e <= total - per_line
                    got.add(e // per_line)
            start = (p * KO + ko + ahead) * K * NR
            want = {min(start + i * per_line, total - per_line) // per_line for i in range(K * NR // per_line)}
            assert want <= got and len(got) <= len(want) + 1


def test_same_numbers_with_prefetches():
    """The function with its prefetches compiles and computes what it did (against numpy float64)."""
    func = _chunked.with_attr("global_symbol", "main")
    after = insert_chunk_prefetch(func, _plan(func))
    lib = tvm.compile(tvm.IRModule({"main": after}), target="llvm")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((P, KO * K, NR)).astype("float32")
    y = np.zeros((P, ROWS, NR), "float32")
    yt = tvm.runtime.tensor(y)
    lib["main"](tvm.runtime.tensor(w), yt)
    want = np.einsum("pkj,r->prj", w.astype(np.float64), np.arange(1, ROWS + 1, dtype=np.float64))
    np.testing.assert_allclose(yt.numpy(), want, rtol=1e-5, atol=1e-5)


def test_plan_whose_loop_is_missing_is_refused():
    other = tirx.Var("elsewhere", "int64")
    plan = _plan(_chunked)
    plan.loop_var = other
    with pytest.raises(ValueError, match="not in the function"):
        insert_chunk_prefetch(_chunked, plan)


# A GEMM nest over column panels: panel p (NR columns of the row-major [KS, PS * NR2] matrix b), row tile r
PS, RS, KS, NR2 = 3, 4, 5, 32


@T.prim_func
def _panels(b: T.Buffer((KS, PS * NR2), "float32"), y: T.Buffer((RS, PS * NR2), "float32")):
    for p, r, k, j in T.grid(PS, RS, KS, NR2):
        y[r, p * NR2 + j] = y[r, p * NR2 + j] + b[k, p * NR2 + j] * T.float32(r + 1)


@pytest.mark.parametrize("when", [False, True])
def test_strided_chunks_cover_the_next_column_panel(when):
    """A strided plan (rows of NR2 elements, a row stride of the matrix width, chunks NR2 apart): over the row
    tiles of panel p the prefetches touch every line of panel p + 1's columns in every row (clamped to the
    buffer), for writing when asked; with a condition, they sit under an `if` and run only when it holds."""
    func = _panels
    loops = _loops(func)
    p, r = loops["p"].loop_var, loops["r"].loop_var
    loads = []
    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.TensorLoad, loads.append), order="pre")
    (b,) = {ld.source.name: ld.source for ld in loads if ld.source.name == "b"}.values()
    cond = tirx.floormod(p, 2) == 0 if when else None
    plan = ChunkPrefetch(b, r, p * NR2, KS * NR2, r, RS, ahead=1, row_elems=NR2, row_stride=PS * NR2,
                         advance=NR2, write=True, when=cond)
    assert plan.lines_per_row == 2 and plan.chunk_lines == KS * 2 and plan.lines_per_step == -(-KS * 2 // RS)
    after = insert_chunk_prefetch(func, plan)
    body = _loops(after)["r"].body
    assert isinstance(body, tirx.SeqStmt) and isinstance(list(body.seq)[-1], tirx.For)
    head = list(body.seq)[:-1]
    if when:
        assert len(head) == 1 and isinstance(head[0], tirx.IfThenElse)
        condition, head = head[0].condition, list(head[0].then_case.seq)
    assert len(head) == plan.lines_per_step
    total, per_line = KS * PS * NR2, 16
    for pv in range(PS):
        if when and not _evaluate(condition, {"p": pv}):
            continue
        got = set()
        for rv in range(RS):
            for stmt in head:
                call = stmt.value
                assert "llvm.prefetch" in str(call) and int(call.args[2].value) == 1  # rw: for writing
                e = _evaluate(call.args[1].args[0].indices[-1], {"p": pv, "r": rv})
                assert 0 <= e <= total - per_line
                got.add(e // per_line)
        want = {min(k * PS * NR2 + (pv + 1) * NR2 + i * per_line, total - per_line) // per_line
                for k in range(KS) for i in range(2)}
        assert got == want


def _prefetch_calls(func):
    """[(shape of the prefetched buffer, for writing, under an `if`)] of a scheduled PrimFunc."""
    def calls_in(node):
        found = []
        tvm_ffi.structural_walk(node, (tvm.ir.expr.Call, found.append), order="pre")
        return [c for c in found if str(c.op.name) == "tirx.call_llvm_intrin" and "llvm.prefetch" in str(c)]

    branches = []
    tvm_ffi.structural_walk(func.body, (tirx.IfThenElse, branches.append), order="pre")
    conditional = [c for branch in branches for c in calls_in(branch.then_case)]
    out = []
    for c in calls_in(func.body):
        buf = c.args[1].args[0].source
        under_if = any(c.same_as(d) for d in conditional)
        out.append((tuple(int(d) for d in buf.shape), bool(int(c.args[2].value)), under_if))
    return out


@pytest.mark.parametrize("what,K,v_too", [(3, 48, True), (0, 48, False), (3, 400, False)])
def test_gemm_panels_prefetch_the_next_panel(what, K, v_too, monkeypatch):
    """relu(W @ X + res) whose X (row-major, 640 columns) is packed per 32-column panel: each row tile
    prefetches its share of the next panel's X columns, residual columns and output lines (for writing);
    none with `panel_prefetch` 0; with a long reduction (K = 400: 100 lines of X per row tile, over
    `prefetch_max_lines`) only the residual and output ones. Results against numpy float64 each time."""
    import dataclasses

    from tvm import relax

    import edgecc.schedules as schedules
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.targets.registry import get_target

    base_params = schedules.cpu_params
    monkeypatch.setattr(schedules, "cpu_params",
                        lambda spec: dataclasses.replace(base_params(spec), panel_prefetch=what))
    M, N = 64, 640
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([K, N], "float32"))
    res = relax.Var("res", relax.TensorType([M, N], "float32"))
    w = relax.Var("w", relax.TensorType([M, K], "float32"))
    with bb.function("main", [x, res, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(w, x), res)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    host = get_target("host")
    lowered = relax_pipeline(host)(bb.get())
    (gemm,) = [f for gv, f in lowered.functions_items()
               if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint]
    assert str(gemm.attrs["edgecc.schedule"]) == "matmul"
    calls = _prefetch_calls(gemm)
    want = ({((M, N), False), ((M, N), True)} if what else set()) | ({((K, N), False)} if v_too else set())
    assert {(shape, write) for shape, write, _ in calls} == want
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype("float32") for s in ((K, N), (M, N), (M, K))]
    ex = tvm.compile(bb.get(), target=host.tvm(), relax_pipeline=relax_pipeline(host))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    want = np.maximum(arrays[2].astype(np.float64) @ arrays[0] + arrays[1], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
