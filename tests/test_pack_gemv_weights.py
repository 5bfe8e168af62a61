"""pack_gemv_weights: GEMV weights become column panels at build time (IR before -> after, numbers vs onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

from edgecc.ir_passes.pack_gemv_weights import (  # noqa: E402
    pack_gemv_weights, pack_panels, panel_layout, panel_width)
from edgecc.schedules.params import cpu_params  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402

HOST = get_target("host")


def _module(x_rows: int, k: int, n: int, extra_use: bool = False):
    """main(x, w, b): y = x @ w + b, optionally also z = x8 @ w (a GEMM on the same weight)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([x_rows, k], "float32"))
    w = relax.Var("w", relax.TensorType([k, n], "float32"))
    b = relax.Var("b", relax.TensorType([n], "float32"))
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, w))
            y = bb.emit(relax.op.add(h, b))
            if extra_use:
                big = bb.emit(relax.op.broadcast_to(relax.op.sum(x, axis=[0], keepdims=True), [16, k]))
                z = bb.emit(relax.op.matmul(big, w))
                y = bb.emit(relax.op.add(y, relax.op.sum(z, axis=[0], keepdims=True)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _ops(func) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        func.body, lambda e: names.append(e.op.name) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def test_gemv_weight_becomes_panels():
    k, n = 40, 96
    nr = panel_width(n, cpu_params(HOST), 32)
    assert nr is not None and n % nr == 0 and nr < n
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype("float32")
    b = rng.standard_normal(n).astype("float32")
    before = _module(1, k, n)
    assert "relax.matmul" in _ops(before["main"]) and "relax.einsum" not in _ops(before["main"])
    after, named, count = pack_gemv_weights(before, [("w", w), ("b", b)], HOST)
    main = after["main"]
    assert count == 1
    assert "relax.matmul" not in _ops(main) and _ops(main).count("relax.einsum") == 1
    assert [int(d) for d in main.params[1].ty.shape.values] == [n // nr, k, nr]
    assert named[0][0] == "w" and named[0][1].shape == (n // nr, k, nr)
    # panel p, row r holds columns p*nr .. p*nr+nr-1 of row r
    np.testing.assert_array_equal(named[0][1][1, 3], w[3, nr:2 * nr])
    # numerics: the rewritten module vs numpy float64
    x = rng.standard_normal((1, k)).astype("float32")
    ex = tvm.compile(after, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, named[0][1], named[1][1]))).numpy()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["shared_with_gemm", "too_many_rows", "one_panel"])
def test_not_packed(case):
    k, n = 40, 96
    mod = {"shared_with_gemm": lambda: _module(1, k, n, extra_use=True),
           "too_many_rows": lambda: _module(cpu_params(HOST).gemv_max_rows + 1, k, n),
           "one_panel": lambda: _module(1, k, 8)}[case]()
    shapes = [tuple(int(d) for d in p.ty.shape.values) for p in mod["main"].params[1:]]
    weights = [(f"p{i}", np.zeros(s, "float32")) for i, s in enumerate(shapes)]
    after, named, count = pack_gemv_weights(mod, weights, HOST)
    assert count == 0 and after["main"].same_as(mod["main"])
    assert [a.shape for _, a in named] == shapes


def test_pack_panels_layout():
    w = np.arange(6 * 8, dtype="float32").reshape(6, 8)
    p = pack_panels(w, 4)
    assert p.shape == (2, 6, 4)
    np.testing.assert_array_equal(np.concatenate([p[0], p[1]], axis=1), w)


@pytest.mark.parametrize("n,gemm", [(3072, False), (1000, True)])
def test_build_matches_onnxruntime(tmp_path, n, gemm):
    """MatMul+Add+Relu (GPT MLP width) and Gemm transB=1 (a classifier head, N=1000) built for host."""
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    k = 200
    rng = np.random.default_rng(1)
    b = rng.standard_normal(n).astype("float32")
    if gemm:
        w = rng.standard_normal((n, k)).astype("float32")
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["y"])]
    else:
        w = rng.standard_normal((k, n)).astype("float32")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
                 helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = build_artifact(str(path), str(tmp_path / "out"), target="host")
    shapes = [p["shape"] for p in result.manifest["params"]]
    nr, n_padded = panel_layout(n, cpu_params(HOST), 32)
    assert [n_padded // nr, k, nr] in shapes  # the weight is stored as panels
    x = rng.standard_normal((1, k)).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = load_artifact(tmp_path / "out").run({"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_panel_width_prefers_whole_vectors():
    """1000 columns on 4-lane NEON: 125 panels of 8 (two vectors), not 100 of 10 (two and a half), which the
    contraction analysis read with the panel index as vector axis and the GEMV template refused."""
    neon = cpu_params(get_target("arm-neon"))
    assert panel_width(1000, neon, 32) == 8
    assert panel_width(1000, cpu_params(get_target("x86-avx512")), 32) == 40  # no whole vectors divide 1000
    assert panel_width(576, neon, 32) == neon.gemv_nr(32)


def test_panel_layout_pads_to_full_panels_when_cheap():
    """1000 columns on AVX-512 (64-wide GEMV tiles): 16 full panels over 1024 columns, not 25 of 40; 96 would
    need a third more columns (keeps its own width); multiples of the tile are left alone."""
    avx512 = cpu_params(get_target("x86-avx512"))
    assert avx512.gemv_nr(32) == 64
    assert panel_layout(1000, avx512, 32) == (64, 1024)
    assert panel_layout(96, avx512, 32) == (panel_width(96, avx512, 32), 96)
    assert panel_layout(3072, avx512, 32) == (64, 3072)


def test_padded_panels_hold_zero_columns_and_compute_the_same():
    """k x 1000 on the host: the stored panels are the weight followed by zero columns; the module's outputs
    (1000 of them, the extra ones cut off) against numpy float64."""
    k, n = 24, 1000
    nr, n_padded = panel_layout(n, cpu_params(HOST), 32)
    assert n_padded > n
    rng = np.random.default_rng(2)
    w = rng.standard_normal((k, n)).astype("float32")
    b = rng.standard_normal(n).astype("float32")
    after, named, count = pack_gemv_weights(_module(1, k, n), [("w", w), ("b", b)], HOST)
    assert count == 1 and "relax.strided_slice" in _ops(after["main"])
    panels = named[0][1]
    assert panels.shape == (n_padded // nr, k, nr)
    flat = np.concatenate(list(panels), axis=1)  # back to [k, n_padded]
    np.testing.assert_array_equal(flat[:, :n], w)
    assert not flat[:, n:].any()
    x = rng.standard_normal((1, k)).astype("float32")
    ex = tvm.compile(after, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, panels, named[1][1]))).numpy()
    assert got.shape == (1, n)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)


@pytest.mark.cross
def test_neon_gemv_panels_under_qemu(neon_runs, tmp_path):
    """A classifier-head GEMV (1 x 64 @ 64 x 1000) on arm-neon: packed, scheduled by the matmul rule, and
    right under qemu against float64."""
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.schedules import schedule_report
    from tests.test_schedules import run_on_neon

    neon = get_target("arm-neon")
    k, n = 64, 1000
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((k, n)).astype("float32"), rng.standard_normal(n).astype("float32")
    new, named, count = pack_gemv_weights(_module(1, k, n), [("w", w), ("b", b)], neon)
    assert count == 1
    report = schedule_report(relax_pipeline(neon)(new))
    assert [r for name, r in report.items() if "einsum" in name] == ["matmul"], report
    new["main"] = new["main"].without_attr("num_input")
    x = rng.standard_normal((1, k)).astype("float32")
    got = run_on_neon(new, [x] + [a for _, a in named], tmp_path)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w + b, rtol=1e-4, atol=1e-4)
