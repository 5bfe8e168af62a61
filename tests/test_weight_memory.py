"""The huge-page weight arena: zero-copy TVM views with the values, dtypes, shapes and alignment of the inputs."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgecc.runtime_bridge.weight_memory import ALIGN, load_weights  # noqa: E402


def _arrays():
    rng = np.random.default_rng(3)
    return [
        rng.standard_normal((3, 1000)).astype("float32"),  # 12000 B: the next one starts mid-page
        rng.integers(-128, 127, (7, 13), dtype=np.int8),
        np.array(2.5, dtype="float32"),  # 0-d
        rng.integers(0, 255, (1 << 20,), dtype=np.uint8),
        np.zeros((2, 0, 4), dtype="float32"),  # empty
        rng.standard_normal((5, 3)).astype("float64")[:, ::2],  # not C-contiguous
        np.array([True, False, True]),
    ]


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_arena_views_equal_inputs(monkeypatch, enabled):
    monkeypatch.setenv("EDGECC_HUGEPAGES", enabled)
    arrays = _arrays()
    arena = load_weights(arrays, tvm.cpu())
    assert len(arena.tensors) == len(arrays)
    for src, t in zip(arrays, arena.tensors):
        got = t.numpy()
        assert got.shape == src.shape and got.dtype == src.dtype
        np.testing.assert_array_equal(got, src)
    expect_arena = enabled == "1" and hasattr(mmap, "MADV_HUGEPAGE")
    assert (arena._map is not None) == expect_arena
    if expect_arena:
        # every tensor starts on a 64-byte boundary of the mapping (the kernels assume it), and is a view:
        # writing the mapping changes what TVM sees
        base = np.frombuffer(arena._map, dtype=np.uint8)
        first = arena.tensors[0]
        assert first.numpy()[0, 0] == arrays[0][0, 0]
        base[:4] = np.frombuffer(np.float32(-7.0).tobytes(), dtype=np.uint8)
        assert first.numpy()[0, 0] == np.float32(-7.0)
        addr = base.ctypes.data
        assert addr % mmap.PAGESIZE == 0
        for t, src in zip(arena.tensors, arrays):
            view = np.from_dlpack(t)  # the same memory TVM's kernels get
            if src.size:
                assert view.ctypes.data % ALIGN == 0 and addr <= view.ctypes.data < addr + len(arena._map)


def test_model_runs_from_arena(tmp_path, monkeypatch):
    """A built model gives the same outputs with and without the arena (same weights, other memory)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)).astype("float32")
    b = rng.standard_normal((40,)).astype("float32")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    build_artifact(str(path), str(tmp_path / "out"), target="host")
    x = rng.standard_normal((1, 48)).astype("float32")
    ref = x.astype(np.float64) @ w + b
    for enabled in ("1", "0"):
        monkeypatch.setenv("EDGECC_HUGEPAGES", enabled)
        got = load_artifact(tmp_path / "out").run({"x": x})["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
