"""`LoadedArtifact.run` passes numpy inputs to TVM without a copy where it can and returns the VM's outputs as
numpy views, but never hands the caller memory it must not write: a weight, an input, or another output."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgecc.build import build_artifact  # noqa: E402
from edgecc.runtime_bridge.host import load_artifact  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """y = relu(x @ w + b); passthrough = Identity(x); const = Identity(c) (a weight); y twice as outputs."""
    tmp = tmp_path_factory.mktemp("io")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype("float32")
    b = rng.standard_normal((48,)).astype("float32")
    c = rng.standard_normal((4, 32)).astype("float32")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["y"]), helper.make_node("Identity", ["y"], ["y2"]),
             helper.make_node("Identity", ["x"], ["passthrough"]), helper.make_node("Identity", ["c"], ["const"])]
    graph = helper.make_graph(
        nodes, "io", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 48]),
         helper.make_tensor_value_info("passthrough", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("const", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp / "io.onnx"
    onnx.save(model, path)
    build_artifact(str(path), str(tmp / "out"), target="host")
    return tmp / "out", w, b, c


def _aligned(shape, offset_bytes=0):
    """A float32 array whose data starts `offset_bytes` past a 64-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_bytes
    return raw[start:start + n * 4].view(np.float32).reshape(shape)


@pytest.mark.parametrize("layout", ["aligned", "misaligned", "read-only", "strided"])
def test_inputs_any_layout_outputs_never_alias(artifact, layout):
    out_dir, w, b, c = artifact
    m = load_artifact(out_dir)
    rng = np.random.default_rng(1)
    values = rng.standard_normal((2, 64)).astype("float32")
    if layout == "aligned":
        x = _aligned((2, 64))
        x[...] = values
        assert x.ctypes.data % 64 == 0
    elif layout == "misaligned":
        x = _aligned((2, 64), offset_bytes=4)
        x[...] = values
    elif layout == "read-only":
        x = values.copy()
        x.flags.writeable = False
    else:
        x = np.repeat(values, 2, axis=1)[:, ::2]
    before = x.copy()
    outs = m.run({"x": x})
    ref = np.maximum(values.astype(np.float64) @ w + b, 0)
    np.testing.assert_allclose(outs["y"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs["y2"], outs["y"])
    np.testing.assert_array_equal(outs["passthrough"], values)
    np.testing.assert_array_equal(outs["const"], c)
    np.testing.assert_array_equal(x, before)  # the model did not write its input
    # no two results share memory, and none shares memory with the input
    arrays = list(outs.values())
    for i, a in enumerate(arrays):
        assert not np.shares_memory(a, x)
        for other in arrays[i + 1:]:
            assert not np.shares_memory(a, other)
    # writing every result leaves the next run's results (weights included) unchanged
    for a in arrays:
        a[...] = -1.0
    again = m.run({"x": values})
    np.testing.assert_allclose(again["y"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again["const"], c)


def test_aligned_writable_inputs_are_not_copied():
    import tvm

    from edgecc.runtime_bridge.host import InputTensors

    inputs = InputTensors(tvm.cpu())
    x = _aligned((3, 40))
    x[...] = 1.5
    odd = _aligned((3, 40), offset_bytes=4)
    odd[...] = np.arange(120, dtype=np.float32).reshape(3, 40)
    t_x, t_odd = inputs([x, odd])
    assert np.from_dlpack(t_x).ctypes.data == x.ctypes.data  # numpy's own buffer
    # TVM takes 64-byte aligned buffers only: a copy, into the same kept tensor on every call
    assert np.from_dlpack(t_odd).ctypes.data != odd.ctypes.data
    np.testing.assert_array_equal(t_odd.numpy(), odd)
    odd[...] = -2.0
    _, again = inputs([x, odd])
    assert np.from_dlpack(again).ctypes.data == np.from_dlpack(t_odd).ctypes.data
    np.testing.assert_array_equal(again.numpy(), odd)
    # another shape gets another tensor
    (other,) = inputs([_aligned((2, 5), offset_bytes=4)])
    assert tuple(other.shape) == (2, 5)


def test_any_alignment_inputs_are_never_copied(artifact):
    """Artifacts whose kernels read inputs unaligned (manifest input_alignment "element") take numpy's own
    buffer at any element-aligned address; strided and read-only arrays are still copied."""
    import tvm

    from edgecc.runtime_bridge.host import InputTensors

    out_dir, *_ = artifact
    assert load_artifact(out_dir).manifest["signature"]["input_alignment"] == "element"
    inputs = InputTensors(tvm.cpu(), any_alignment=True)
    odd = _aligned((3, 40), offset_bytes=4)
    odd[...] = 2.0
    frozen = _aligned((3, 40), offset_bytes=4)
    frozen.flags.writeable = False
    strided = np.ones((3, 80), np.float32)[:, ::2]
    t_odd, t_frozen, t_strided = inputs([odd, frozen, strided])
    assert t_odd.data_ptr() == odd.ctypes.data  # numpy's own buffer, 4 bytes past a 64-byte boundary
    assert t_frozen.data_ptr() != frozen.ctypes.data and t_strided.data_ptr() != strided.ctypes.data
    np.testing.assert_array_equal(np.from_dlpack(t_strided), strided)


def test_output_views_any_dtype_never_alias():
    """The alias check works on TVM's own data pointers, so dtypes numpy cannot take over DLPack (bfloat16)
    neither break loading nor running; such results come back as copies."""
    import ml_dtypes
    import tvm

    from edgecc.runtime_bridge.host import OutputViews

    weight = tvm.runtime.tensor(np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16))
    views = OutputViews([weight, tvm.runtime.tensor(np.zeros(3, np.float32))])
    x = tvm.runtime.tensor(np.arange(4, dtype=np.float32))
    fresh = tvm.runtime.tensor(np.full(5, 2.0, np.float32))
    out = views([fresh, fresh, x, weight], [x])
    np.testing.assert_array_equal(out[0], np.full(5, 2.0))
    assert np.from_dlpack(fresh).ctypes.data == out[0].ctypes.data  # a fresh result: a view, no copy
    assert not np.shares_memory(out[0], out[1])  # the same result twice: the second is a copy
    assert out[2].ctypes.data != x.data_ptr()  # an input passed through: a copy
    np.testing.assert_array_equal(out[3].astype(np.float32), np.arange(8))  # a bfloat16 weight: a copy


@pytest.mark.parametrize("preset", [None, "1"])
def test_pool_threads_unpinned_unless_asked(monkeypatch, preset):
    """set_num_threads leaves TVM's pool unpinned (TVM_BIND_THREADS=0) unless the environment says otherwise."""
    import os

    from edgecc.runtime_bridge.host import default_num_threads, set_num_threads

    if preset is None:
        monkeypatch.delenv("TVM_BIND_THREADS", raising=False)
    else:
        monkeypatch.setenv("TVM_BIND_THREADS", preset)
    monkeypatch.setenv("TVM_NUM_THREADS", str(default_num_threads()))  # restored after the test
    set_num_threads(default_num_threads())
    assert os.environ["TVM_BIND_THREADS"] == (preset or "0")


def test_pool_gets_the_threads_asked_for():
    """TVM sizes its pool when first used, from $TVM_NUM_THREADS or half the cores, and config_threadpool alone
    cannot add workers: in a fresh process without the variable, asking for 2 threads must give TVM 2 workers
    (it gave 1 on a 2-core machine before set_num_threads set the variable)."""
    import os
    import subprocess
    import sys

    code = ("import tvm_ffi\n"
            "from edgecc.runtime_bridge.host import set_num_threads\n"
            "set_num_threads(2)\n"
            "print(tvm_ffi.get_global_func('runtime.NumThreads')())\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"


@pytest.mark.parametrize("declared", ["float32", "bfloat16", "float8_e4m3fn", "int64"])
@pytest.mark.parametrize("numpy_knows", [True, False])
def test_check_feeds_dtype_mismatch_is_a_clear_error(declared, numpy_knows, monkeypatch):
    """Every declared dtype, numpy's own or not, refuses a float64 feed with a one-line error and takes a feed of
    its own dtype (the check compares cached numpy dtypes, and must never compare with None: numpy reads it
    as float64)."""
    import ml_dtypes

    from edgecc.errors import EdgeccError
    from edgecc.frontend.signature import Signature, TensorSig
    from edgecc.runtime_bridge.host import check_feeds

    from edgecc.runtime_bridge import host

    if not numpy_knows:  # as without ml_dtypes: the check falls back to comparing names
        monkeypatch.setattr(host, "_numpy_dtype", lambda name: None)
    sig = Signature((TensorSig("x", declared, (2, 3)),), ())
    with pytest.raises(EdgeccError, match=f"has dtype float64, the model takes {declared}"):
        check_feeds(sig, {"x": np.zeros((2, 3), np.float64)})
    own = np.zeros((2, 3), getattr(ml_dtypes, declared, None) or np.dtype(declared))
    (got,) = check_feeds(sig, {"x": own})
    assert str(got.dtype) == declared


def test_rebuilt_artifact_reloaded_in_one_process_runs_the_new_library(tmp_path):
    """dlopen returns the library already loaded from a path, whatever file is there now: a model rebuilt into
    the same directory and loaded again in one process ran the first model's code with the new weights (seen
    in CI as 'main expects 7 arguments, 9 provided'). Both models must run their own code."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16)).astype("float32")
    w = rng.standard_normal((16, 8)).astype("float32")

    def build(activation: str):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(activation, ["h"], ["y"])], "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
        path = tmp_path / f"{activation}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        build_artifact(str(path), str(tmp_path / "out"), target="host", force=True)
        return load_artifact(tmp_path / "out")

    h = x.astype(np.float64) @ w.astype(np.float64)
    first = build("Relu")
    np.testing.assert_allclose(first.run({"x": x})["y"], np.maximum(h, 0), rtol=1e-5, atol=1e-5)
    second = build("Sigmoid")  # same directory, same arguments, other code; the first stays loaded
    np.testing.assert_allclose(second.run({"x": x})["y"], 1 / (1 + np.exp(-h)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first.run({"x": x})["y"], np.maximum(h, 0), rtol=1e-5, atol=1e-5)


def test_input_copies_any_dtype_and_layout_are_exact():
    """Inputs TVM cannot take as they are (misaligned, strided, a dtype numpy's DLPack lacks) are copied into
    tensors kept between calls; every call's values arrive, whatever the copy path."""
    import ml_dtypes
    import tvm

    from edgecc.runtime_bridge.host import InputTensors

    inputs = InputTensors(tvm.cpu())
    rng = np.random.default_rng(5)
    for call in range(3):
        f32 = _aligned((3, 40), offset_bytes=4)
        f32[...] = rng.standard_normal((3, 40))
        strided = rng.standard_normal((6, 40)).astype("float32")[::2]
        bf16 = rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16)
        i64 = np.arange(call, call + 9, dtype=np.int64).reshape(3, 3)
        args = inputs([f32, strided, bf16, i64])
        np.testing.assert_array_equal(args[0].numpy(), f32)
        np.testing.assert_array_equal(args[1].numpy(), strided)
        np.testing.assert_array_equal(args[2].numpy().astype(np.float32), bf16.astype(np.float32))
        np.testing.assert_array_equal(args[3].numpy(), i64)
