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
           tirx.Min: min, tirx.Max: max}
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
