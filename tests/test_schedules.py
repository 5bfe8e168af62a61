"""Default CPU schedules (edgecc.schedules): each rule applies, and the compiled kernels are right.

Shapes are deliberately not multiples of the tiles (odd, prime, 1). Numerics are checked against numpy in
float64; "applied" is checked on the IR after the schedule pass (rule attribute, parallel/vectorized
loops). One arm-neon build checks that the rules compile for a cross target (run under qemu elsewhere).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, relax_pipeline  # noqa: E402
from edgecc.schedules import (  # noqa: E402
    SCHEDULE_ATTR,
    cpu_params,
    cpu_schedule_passes,
    schedule_report,
    unscheduled_primfuncs,
)
from edgecc.targets.registry import get_target  # noqa: E402

R = relax.op
HOST = get_target("host")


def _module(inputs, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in inputs]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _scheduled(mod, spec=HOST):
    fused = tvm.transform.Sequential(legalize_and_fuse_passes())(mod)
    with spec.tvm():
        return tvm.transform.Sequential(cpu_schedule_passes(spec))(fused)


def _loop_kinds(func) -> set:
    kinds = set()

    def visit(node):
        kinds.add(int(node.kind))

    import tvm_ffi

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="pre")
    return kinds


def _run(mod, inputs, spec=HOST):
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _check(mod, inputs, ref, expect_rule, *, rtol=1e-4, atol=1e-4):
    sched = _scheduled(mod)
    report = schedule_report(sched)
    assert expect_rule in report.values(), report
    big = max(a.size for a in inputs) >= 64  # tiny kernels may legitimately stay serial
    for gv, func in sched.functions_items():
        if big and isinstance(func, tirx.PrimFunc) and str(func.attrs[SCHEDULE_ATTR]) == expect_rule:
            kinds = _loop_kinds(func)
            assert int(tirx.ForKind.PARALLEL) in kinds or int(tirx.ForKind.VECTORIZED) in kinds, gv.name_hint
    out = _run(mod, inputs)
    expect = ref(*[a.astype("float64") for a in inputs])
    np.testing.assert_allclose(out, expect, rtol=rtol, atol=atol)
    return sched


def run_on_neon(mod, arrays, tmp_path):
    """Compile `mod` (weights as inputs) for arm-neon and run it under qemu on `arrays`: its one output."""
    from edgecc.runtime_bridge.emulated import run_emulated
    from edgecc.runtime_bridge.params_file import write_params

    neon = get_target("arm-neon")
    ex = tvm.compile(mod, target=neon.tvm(), relax_pipeline=relax_pipeline(neon))
    ex.export_library(str(tmp_path / "model.so"), fcompile=tvm.support.cc.cross_compiler(neon.cross_compiler))
    write_params(tmp_path / "params.bin", [])
    (got,) = run_emulated(tmp_path, neon, arrays)
    return got


def _rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype("float32")


# ---------------------------------------------------------------------------------------------------
# matmul family
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(37, 29, 67), (1, 17, 33), (13, 5, 1), (64, 96, 48), (16, 31, 100)])
def test_dense(m, k, n):
    mod = _module([("x", (m, k)), ("w", (k, n))], lambda bb, x, w: R.matmul(x, w))
    sched = _check(mod, [_rand(m, k), _rand(k, n)], lambda x, w: x @ w, "matmul")
    func = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)][0]
    if n % cpu_params(HOST).lanes() == 0 or n > cpu_params(HOST).lanes():
        assert int(tirx.ForKind.VECTORIZED) in _loop_kinds(func)


def test_dense_bias_gelu_epilogue_fused():
    m, k, n = 19, 23, 64
    mod = _module([("x", (m, k)), ("w", (k, n)), ("b", (n,))],
                  lambda bb, x, w, b: R.nn.gelu(bb.emit(R.add(bb.emit(R.matmul(x, w)), b))))
    from math import erf

    verf = np.vectorize(erf)
    sched = _check(mod, [_rand(m, k), _rand(k, n), _rand(n)],
                   lambda x, w, b: 0.5 * (x @ w + b) * (1 + verf((x @ w + b) / np.sqrt(2))), "matmul")
    (func,) = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)]
    # the epilogue runs at the register tile: no full-size intermediate is left in the function
    assert "T_add_intermediate" not in func.script()


def test_dense_odd_n_with_epilogue_padded():
    m, k, n = 9, 7, 45  # n is not a multiple of the vector: padded tile, separate epilogue stage
    mod = _module([("x", (m, k)), ("w", (k, n)), ("b", (n,))],
                  lambda bb, x, w, b: R.nn.relu(bb.emit(R.add(bb.emit(R.matmul(x, w)), b))))
    _check(mod, [_rand(m, k), _rand(k, n), _rand(n)], lambda x, w, b: np.maximum(x @ w + b, 0), "matmul")


@pytest.mark.parametrize("a,b", [((3, 17, 9), (3, 9, 21)), ((5, 7, 16), (5, 16, 7)), ((2, 3, 11, 5), (5, 13))])
def test_batched_and_broadcast_matmul(a, b):
    mod = _module([("a", a), ("b", b)], lambda bb, x, y: R.matmul(x, y))
    _check(mod, [_rand(*a), _rand(*b)], lambda x, y: x @ y, "matmul")


def test_matmul_transposed_weight_nt():
    m, k, n = 33, 19, 40
    mod = _module([("x", (m, k)), ("w", (n, k))],
                  lambda bb, x, w: R.matmul(x, bb.emit(R.permute_dims(w, [1, 0]))))
    _check(mod, [_rand(m, k), _rand(n, k)], lambda x, w: x @ w.T, "matmul")


def test_gemv_decode_shape():
    k, n = 67, 130
    mod = _module([("x", (1, k)), ("w", (k, n))], lambda bb, x, w: R.matmul(x, w))
    _check(mod, [_rand(1, k), _rand(k, n)], lambda x, w: x @ w, "matmul")


# ---------------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------------


def _conv_ref(x, w, stride, pad, groups=1):
    import torch

    return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad,
                                      groups=groups).numpy()


@pytest.mark.parametrize("n,c,h,w,f,kh,stride,pad,rule", [
    (1, 3, 13, 11, 20, 3, 1, 1, "conv2d"),  # 20 output channels: quarter-vector tiles
    (2, 5, 9, 9, 32, 3, 2, 0, "conv2d"),
    (1, 7, 5, 6, 16, 1, 1, 0, "conv2d"),
    (1, 7, 5, 6, 33, 1, 1, 0, None),  # no vector tile fits 33 channels: another rule, still right
    (1, 4, 13, 13, 32, 3, 1, 1, "conv2d"),  # width 13: two row tiles of 7 and 6 (the second partial)
    (1, 3, 9, 55, 16, 3, 1, 1, "conv2d"),  # width 55: 11-row tiles (on 32-register targets)
])
def test_conv2d_nchw(n, c, h, w, f, kh, stride, pad, rule):
    pytest.importorskip("torch")
    mod = _module([("x", (n, c, h, w)), ("k", (f, c, kh, kh))],
                  lambda bb, x, k: R.nn.conv2d(x, k, strides=stride, padding=pad))
    inputs = [_rand(n, c, h, w), _rand(f, c, kh, kh)]
    ref = lambda x, k: _conv_ref(x.astype("float32"), k.astype("float32"), stride, pad)  # noqa: E731
    if rule is None:
        np.testing.assert_allclose(_run(mod, inputs), ref(*inputs), rtol=1e-3, atol=1e-3)
    else:
        _check(mod, inputs, ref, rule, rtol=1e-3, atol=1e-3)


def test_conv2d_bias_relu_and_depthwise_numerics():
    pytest.importorskip("torch")
    n, c, h, w = 1, 6, 10, 7
    mod = _module([("x", (n, c, h, w)), ("k", (c, 1, 3, 3)), ("b", (1, c, 1, 1))],
                  lambda bb, x, k, b: R.nn.relu(bb.emit(R.add(bb.emit(
                      R.nn.conv2d(x, k, padding=1, groups=c)), b))))
    x, k, b = _rand(n, c, h, w), _rand(c, 1, 3, 3), _rand(1, c, 1, 1)
    out = _run(mod, [x, k, b])
    expect = np.maximum(_conv_ref(x, k, 1, 1, groups=c) + b, 0)
    np.testing.assert_allclose(out, expect, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# reductions, elementwise
# ---------------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 64), (1, 1, 1), (2, 48)])
def test_softmax(shape):
    mod = _module([("x", shape)], lambda bb, x: R.nn.softmax(x, axis=-1))
    _check(mod, [_rand(*shape)], _softmax, "reduction", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,cols", [(7, 384), (5, 33), (1, 1)])
def test_layernorm(rows, cols):
    mod = _module([("x", (rows, cols)), ("g", (cols,)), ("b", (cols,))],
                  lambda bb, x, g, b: R.nn.layer_norm(x, g, b, axes=[-1]))

    def ref(x, g, b):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    _check(mod, [_rand(rows, cols), _rand(cols), _rand(cols)], ref, "reduction", rtol=1e-4, atol=1e-4)


def test_mean_over_last_axis():
    mod = _module([("x", (6, 5, 41))], lambda bb, x: R.mean(x, axis=[-1]))
    _check(mod, [_rand(6, 5, 41)], lambda x: x.mean(-1), "reduction", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 67), (4, 129), (1,), (2, 3, 16)])
def test_elementwise_chain(shape):
    mod = _module([("x", shape), ("y", shape)],
                  lambda bb, x, y: R.tanh(bb.emit(R.multiply(bb.emit(R.add(x, y)), relax.const(0.5, "float32")))))
    _check(mod, [_rand(*shape), _rand(*shape, seed=1)], lambda x, y: np.tanh((x + y) * 0.5), "elementwise",
           rtol=1e-5, atol=1e-5)


def test_transpose_broadcast_elementwise():
    mod = _module([("x", (37, 50)), ("b", (37, 1))],
                  lambda bb, x, b: R.permute_dims(bb.emit(R.add(x, b)), [1, 0]))
    _check(mod, [_rand(37, 50), _rand(37, 1)], lambda x, b: (x + b).T, "elementwise")


# ---------------------------------------------------------------------------------------------------
# the pass itself
# ---------------------------------------------------------------------------------------------------


def test_scheduled_functions_are_marked_and_not_rescheduled():
    mod = _module([("x", (8, 8)), ("w", (8, 8))], lambda bb, x, w: R.matmul(x, w))
    once = _scheduled(mod)
    assert unscheduled_primfuncs(once) == []
    with HOST.tvm():
        twice = tvm.transform.Sequential(cpu_schedule_passes(HOST))(once)
    for gv, func in once.functions_items():
        if isinstance(func, tirx.PrimFunc):
            tvm.ir.assert_structural_equal(func, twice[gv])


def test_failing_rule_falls_back_to_unscheduled():
    from edgecc.schedules.base import ScheduleRule, apply_rules_pass

    class Broken(ScheduleRule):
        name = "broken"

        def apply(self, sch, spec, params):
            sch.get_sblock("no such block")
            return sch

    fused = tvm.transform.Sequential(legalize_and_fuse_passes())(
        _module([("x", (4, 4))], lambda bb, x: R.exp(x)))
    with HOST.tvm():
        out = apply_rules_pass([Broken()], HOST, cpu_params(HOST))(fused)
    (name,) = unscheduled_primfuncs(out)
    assert "broken" in schedule_report(out)[name]
    tvm.ir.assert_structural_equal(out[name].without_attr("edgecc.schedule").without_attr(
        "edgecc.schedule_error"), fused[name])


def test_arm_neon_build_compiles(tmp_path):
    import shutil

    spec = get_target("arm-neon")
    mod = _module([("x", (19, 24)), ("w", (24, 40)), ("b", (40,))],
                  lambda bb, x, w, b: R.nn.softmax(bb.emit(R.add(bb.emit(R.matmul(x, w)), b)), axis=-1))
    sched = _scheduled(mod, spec)
    assert {"matmul", "reduction"} <= set(schedule_report(sched).values()), schedule_report(sched)
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec))
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64 cross compiler not installed")
    path = tmp_path / "model.so"
    ex.export_library(str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    assert path.read_bytes()[:4] == b"\x7fELF"


# ---------------------------------------------------------------------------------------------------
# panel packing, padded conv input, row tiles, GEMV widths (profile-driven changes)
# ---------------------------------------------------------------------------------------------------


def _blocks_under_parallel(func) -> list[set]:
    """For every parallel loop of `func`: the names of the blocks inside it."""
    import tvm_ffi
    from tvm import s_tir

    out = []

    def visit(loop):
        if int(loop.kind) == int(tirx.ForKind.PARALLEL):
            names = set()
            tvm_ffi.structural_walk(loop.body, (s_tir.SBlock, lambda b: names.add(b.name_hint)), order="pre")
            out.append(names)

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="pre")
    return out


@pytest.mark.parametrize("m,k,n", [(20, 33, 544), (37, 19, 520), (17, 70, 1000)])
def test_dense_weight_packed_per_panel(m, k, n):
    # rows of >= 2 KiB are packed, and with >= 8 panels each panel is packed under the parallel panel loop
    # (n = 520, 1000: not multiples of the tile, the packed panel is zero-padded)
    mod = _module([("x", (m, k)), ("w", (k, n))], lambda bb, x, w: R.matmul(x, w))
    sched = _check(mod, [_rand(m, k), _rand(k, n)], lambda x, w: x @ w, "matmul")
    (func,) = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)]
    groups = _blocks_under_parallel(func)
    pack = [g for g in groups if any(name.startswith("w_") for name in g)]
    assert pack and any("matmul_update" in g for g in pack), groups  # pack and micro-kernel share the loop


def test_dense_packed_with_epilogue_numerics():
    m, k, n = 23, 41, 528
    mod = _module([("x", (m, k)), ("w", (k, n)), ("b", (n,)), ("r", (m, n))],
                  lambda bb, x, w, b, r: R.add(bb.emit(R.add(bb.emit(R.matmul(x, w)), b)), r))
    _check(mod, [_rand(m, k), _rand(k, n), _rand(n), _rand(m, n)], lambda x, w, b, r: x @ w + b + r, "matmul")


def _conv_ref64(x, w, stride, pad):
    """NCHW conv2d in float64 with numpy (im2col)."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, f, oh, ow))
    for ry in range(kh):
        for rx in range(kw):
            patch = xp[:, :, ry:ry + stride * oh:stride, rx:rx + stride * ow:stride]
            out += np.einsum("nchw,fc->nfhw", patch, w[:, :, ry, rx])
    return out


@pytest.mark.parametrize("c,h,w,f,kh,stride,pad", [
    (5, 14, 14, 48, 3, 1, 1),  # width 14: 7-row tiles, no partial tile
    (3, 15, 17, 32, 7, 2, 3),  # a 7x7 stride-2 stem on odd sizes
    (9, 7, 7, 64, 3, 1, 1),  # width 7
    (6, 11, 13, 40, 3, 2, 1),  # 40 channels: padded vector tile, strided
    (16, 30, 30, 64, 1, 1, 0),  # 1x1, input larger than the weight: input rows outermost
    (8, 20, 20, 272, 1, 2, 0),  # 1x1 stride 2, 17 panels but input larger: packed up front, input outer
])
def test_conv2d_padded_input_stays_separate(c, h, w, f, kh, stride, pad):
    mod = _module([("x", (1, c, h, w)), ("k", (f, c, kh, kh))],
                  lambda bb, x, k: R.nn.conv2d(x, k, strides=stride, padding=pad))
    sched = _check(mod, [_rand(1, c, h, w), _rand(f, c, kh, kh)],
                   lambda x, k: _conv_ref64(x, k, stride, pad), "conv2d", rtol=1e-4, atol=1e-4)
    (func,) = [f_ for _, f_ in sched.functions_items() if isinstance(f_, tirx.PrimFunc)]
    import tvm_ffi
    from tvm import s_tir

    updates = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, lambda b: updates.append(b) if b.name_hint.endswith(
        "_update") else None), order="pre")
    assert updates and all("if_then_else" not in u.body.script() for u in updates)  # no bounds checks inside


def test_choose_row_tile():
    from edgecc.schedules.contraction import choose_row_tile

    # whole tiles from mr/2 + 1 up to max_rows, the tallest; else equal tiles of at most mr rows
    widths = (14, 7, 28, 56, 112, 128, 3, 13, 1, 55, 27, 111, 24, 17, 22)
    assert [choose_row_tile(m, 8, 11) for m in widths] == [7, 7, 7, 8, 8, 8, 3, 7, 1, 11, 9, 8, 8, 6, 11]
    assert [choose_row_tile(m, 8) for m in (13, 55, 27)] == [7, 5, 7]
    assert choose_row_tile(10, 6) == 5 and choose_row_tile(11, 6) == 6


def test_max_rows_leaves_registers_for_broadcasts():
    from edgecc.schedules.params import cpu_params
    from edgecc.targets.registry import get_target

    # 32 registers, 2-vector rows: 22 accumulators (24 and 26 measured slower than 8-row tiles); 16: mr
    assert cpu_params(get_target("arm-neon")).max_rows == 11
    assert cpu_params(get_target("x86-avx2")).max_rows == cpu_params(get_target("x86-avx2")).mr


@pytest.mark.parametrize("k,n", [(70, 120), (33, 1000)])
def test_gemv_odd_width_not_padded(k, n):
    mod = _module([("x", (1, k)), ("w", (k, n)), ("b", (n,))],
                  lambda bb, x, w, b: R.add(bb.emit(R.matmul(x, w)), b))
    sched = _check(mod, [_rand(1, k), _rand(k, n), _rand(n)], lambda x, w, b: x @ w + b, "matmul")
    (func,) = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert "w_pad" not in func.script()  # a memory-bound GEMV does not copy its matrix
