"""Work stealing in parallel loops (edgecc/ir_passes/work_stealing.py, runtime_bridge/native/edgecc_parallel.c).

The claim protocol is tested on its own (every iteration handed out exactly once, under real threads), the
pass like TVM's own passes (IR before -> after), and the compiled kernels against numpy."""

from __future__ import annotations

import ctypes
import subprocess
import threading

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from edgecc.ir_passes.work_stealing import PIPELINE, steal_parallel_loops
from edgecc.runtime_bridge.parallel_runtime import SOURCE, parallel_object
from edgecc.targets.registry import get_target


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    """The C helper as a shared library, called through ctypes (which releases the GIL: threads race)."""
    lib = tmp_path_factory.mktemp("steal") / "libedgecc_parallel.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-x", "c", str(SOURCE), "-o", str(lib)], check=True)
    h = ctypes.CDLL(str(lib))
    for name in ("edgecc_parallel_init", "edgecc_parallel_claim"):
        getattr(h, name).restype = ctypes.c_int32
    return h


def _claims(helper, ranges, w, shares, chunk):
    slot = (ctypes.c_int32 * 2)()
    got = []
    while helper.edgecc_parallel_claim(ranges, slot, w, shares, chunk):
        got.append((slot[0], slot[1]))
    return got


@pytest.mark.parametrize("n,shares,chunk", [(37, 4, 1), (1000, 2, 3), (5, 4, 1), (2, 2, 1), (64, 64, 1)])
def test_every_iteration_is_claimed_once_under_real_threads(helper, n, shares, chunk):
    for _ in range(20):
        ranges = (ctypes.c_int64 * shares)()
        helper.edgecc_parallel_init(ranges, shares, n)
        results = [None] * shares
        threads = [threading.Thread(target=lambda w=w: results.__setitem__(w, _claims(helper, ranges, w, shares,
                                                                                       chunk)))
                   for w in range(shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        taken = sorted(i for claims in results for b, c in claims for i in range(b, b + c))
        assert taken == list(range(n))


def test_a_share_runs_front_first_then_steals_from_the_back_of_the_share_behind(helper):
    ranges = (ctypes.c_int64 * 3)()
    helper.edgecc_parallel_init(ranges, 3, 9)  # shares [0,3) [3,6) [6,9), as TVM's static split
    got = _claims(helper, ranges, 1, 3, 1)  # share 1 alone: its own share, then share 0's back, then share 2's
    assert [b for b, _ in got] == [3, 4, 5, 2, 1, 0, 8, 7, 6]
    assert _claims(helper, ranges, 0, 3, 1) == []


def test_claims_shrink_as_a_share_runs_out(helper):
    """The owner takes a quarter of what its share has left (few claims on kernels of many tiny iterations), a
    thief half of what the victim has left (a slow owner is relieved in a few steps)."""
    ranges = (ctypes.c_int64 * 2)()
    helper.edgecc_parallel_init(ranges, 2, 64)  # [0, 32) and [32, 64)
    slot = (ctypes.c_int32 * 2)()
    assert helper.edgecc_parallel_claim(ranges, slot, 0, 2, 1) and (slot[0], slot[1]) == (0, 8)
    assert helper.edgecc_parallel_claim(ranges, slot, 0, 2, 1) and (slot[0], slot[1]) == (8, 6)
    assert _claims(helper, ranges, 1, 2, 1)[:2] == [(32, 8), (40, 6)]
    rest = _claims(helper, ranges, 1, 2, 1)
    assert rest == [] and _claims(helper, ranges, 0, 2, 1) == []  # share 1 took share 0's rest too
    ranges = (ctypes.c_int64 * 2)()
    helper.edgecc_parallel_init(ranges, 2, 64)
    helper.edgecc_parallel_claim(ranges, slot, 1, 2, 1)  # share 1 takes [32, 40)
    while slot[0] + slot[1] < 64:  # and runs its share out, from the front
        assert helper.edgecc_parallel_claim(ranges, slot, 1, 2, 1) and slot[0] >= 32
    assert helper.edgecc_parallel_claim(ranges, slot, 1, 2, 1)
    assert (slot[0], slot[1]) == (16, 16)  # its first steal: the back half of share 0 (none of it claimed yet)


@T.prim_func
def _scale_rows(a: T.Buffer((37, 8), "float32"), b: T.Buffer((37, 8), "float32")):
    for i in T.parallel(37):
        for j in range(8):
            b[i, j] = a[i, j] * T.float32(2) + T.Cast("float32", i)
    for k in T.parallel(1):  # a single iteration: nothing to share
        b[0, 0] = b[0, 0] + T.float32(0)


def _loops(stmt) -> list:
    found = []

    def visit(s, mutator):
        found.append(s)
        return mutator.default_mutate(s)

    tvm_ffi.structural_mutate(stmt, (tirx.For, visit))
    return found


def _externs(stmt) -> list[str]:
    text = stmt.script() if hasattr(stmt, "script") else str(stmt)
    return [name for name in ("edgecc_parallel_init", "edgecc_parallel_claim", "edgecc_parallel_begin",
                              "edgecc_parallel_count", "runtime.NumThreads") if name in text]


def test_pass_turns_the_parallel_loop_into_shares_that_claim_chunks():
    before = _scale_rows
    after = steal_parallel_loops(before)
    kinds = {str(f.loop_var.name): f.kind for f in _loops(after.body)}
    # before: i parallel (37), k parallel (1); after: i serial inside the claimed chunk, one parallel loop over
    # the shares, k untouched
    assert {str(f.loop_var.name): f.kind for f in _loops(before.body)} == {
        "i": tirx.ForKind.PARALLEL, "j": tirx.ForKind.SERIAL, "k": tirx.ForKind.PARALLEL}
    assert kinds == {"steal_w": tirx.ForKind.PARALLEL, "i": tirx.ForKind.SERIAL, "j": tirx.ForKind.SERIAL,
                     "k": tirx.ForKind.PARALLEL}
    assert _externs(after.body) == ["edgecc_parallel_init", "edgecc_parallel_claim", "edgecc_parallel_begin",
                                    "edgecc_parallel_count", "runtime.NumThreads"]
    assert "T.While" in after.script() or "while" in after.script()
    assert _externs(before.body) == []


_RUN_KERNEL = """
import sys, numpy as np, tvm, tvm_ffi
f = tvm.runtime.load_module(sys.argv[1])["main"]
threads = tvm_ffi.get_global_func("runtime.NumThreads")()
assert threads == int(sys.argv[2]) or int(sys.argv[2]) > 2, threads  # this machine: 2 cores
a = np.random.default_rng(0).standard_normal((37, 8)).astype("float32")
want = (a.astype("float64") * 2 + np.arange(37)[:, None]).astype("float32")
for _ in range(200):  # a race would show up as a row left NaN (never claimed)
    b = tvm.runtime.tensor(np.full((37, 8), np.nan, "float32"))
    f(tvm.runtime.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), want)
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_kernel_matches_numpy(tmp_path, threads):
    """Built with the work-stealing pipeline and linked with the helper, as artifacts are; run in a fresh
    process per thread count (the tests' own TVM pool has one thread and cannot grow)."""
    import os
    import sys

    spec = get_target("host")
    lib = tvm.tirx.build(tvm.IRModule({"main": _scale_rows}), target=spec.tvm(), pipeline=PIPELINE)
    path = tmp_path / "k.so"
    lib.export_library(str(path), addons=[str(parallel_object(spec))])
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    run = subprocess.run([sys.executable, "-c", _RUN_KERNEL, str(path), str(threads)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_which_targets_steal(monkeypatch):
    from edgecc.ir_passes.work_stealing import tir_pipeline

    assert tir_pipeline(get_target("host")) == PIPELINE
    assert tir_pipeline(get_target("arm-neon")) == PIPELINE
    assert tir_pipeline(get_target("riscv64-rvv")) == "default"  # qemu-riscv64 aborts on it (see STATIC_ARCHS)
    assert tir_pipeline(get_target("cuda")) == "default"
    monkeypatch.setenv("EDGECC_WORK_STEALING", "0")
    assert tir_pipeline(get_target("host")) == "default"
