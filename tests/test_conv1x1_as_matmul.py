"""1x1 convolutions as GEMMs (`edgecc.ir_passes.conv1x1_as_matmul`): the IR before -> after, the convolutions
it must leave alone, the fused kernels it leads to, and builds checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from edgecc.ir_passes.conv1x1_as_matmul import conv1x1_as_matmul, tile_fits  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402

R = relax.op
F32 = "float32"


def _conv_module(x_shape, w_shape, epilogue=True, pool=False, **conv_attrs):
    """main(x, w, s) = relu(conv2d(x, w) * reshape(s, [1, co, 1, 1])) (num_input 1: w and s are weights),
    [then a 2x2 max pool]."""
    co = w_shape[0]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), F32))
    w = relax.Var("w", relax.TensorType(list(w_shape), F32))
    s = relax.Var("s", relax.TensorType([co], F32))
    with bb.function("main", [x, w, s], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(R.nn.conv2d(x, w, **conv_attrs))
            if epilogue:
                y = bb.emit(R.multiply(y, R.reshape(s, [1, co, 1, 1])))
                y = bb.emit(R.nn.relu(y))
            if pool:
                y = bb.emit(R.nn.max_pool2d(y, pool_size=[2, 2], strides=[2, 2]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _weights(w_shape, seed=0):
    rng = np.random.default_rng(seed)
    return [("w", rng.standard_normal(w_shape).astype(F32)), ("s", rng.random(w_shape[0]).astype(F32))]


def test_ir_before_after_stride2():
    """conv(x, w, stride 2) * s -> relu  ==>  relu(matmul(w2, reshape(x[:, :, ::2, ::2])) * s2), reshaped."""
    ci, co, h, w = 3, 5, 13, 9
    mod = _conv_module((1, ci, h, w), (co, ci, 1, 1), strides=[2, 2])
    new, named, count = conv1x1_as_matmul(mod, _weights((co, ci, 1, 1)))
    assert count == 1

    ho, wo = 7, 5
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, ci, h, w], F32))
    w2 = relax.Var("w_cols", relax.TensorType([co, ci], F32))
    s = relax.Var("s", relax.TensorType([co], F32))
    with bb.function("main", [x, w2, s], attrs={"num_input": 1}):
        with bb.dataflow():
            xs = bb.emit(R.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[h, w], strides=[2, 2]))
            x2 = bb.emit(R.reshape(xs, [ci, ho * wo]))
            m = bb.emit(R.matmul(w2, x2))
            s4 = bb.emit(R.reshape(s, [1, co, 1, 1]))
            s2 = bb.emit(R.reshape(s4, [co, 1]))
            y = bb.emit(R.multiply(m, s2))
            y = bb.emit(R.nn.relu(y))
            y = bb.emit(R.reshape(y, [1, co, ho, wo]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(new, bb.get())
    assert named[0][1].shape == (co, ci)  # the weight is stored as [co, ci]
    np.testing.assert_array_equal(named[0][1], _weights((co, ci, 1, 1))[0][1][:, :, 0, 0])


@pytest.mark.parametrize("case", ["3x3", "grouped", "padded", "batch2", "nhwc", "weight_not_param"])
def test_not_rewritten(case):
    x_shape, w_shape, attrs = (1, 8, 6, 6), (4, 8, 1, 1), {}
    if case == "3x3":
        w_shape, attrs = (4, 8, 3, 3), {"padding": [1, 1]}
    elif case == "grouped":
        w_shape, attrs = (4, 4, 1, 1), {"groups": 2}
    elif case == "padded":
        attrs = {"padding": [1, 1]}
    elif case == "batch2":
        x_shape = (2, 8, 6, 6)
    elif case == "nhwc":
        x_shape, w_shape, attrs = (1, 6, 6, 8), (1, 1, 8, 4), {"data_layout": "NHWC", "kernel_layout": "HWIO"}
    if case == "weight_not_param":
        mod = _conv_module(x_shape, w_shape)
        mod["main"] = mod["main"].with_attr("num_input", 2)  # w is now an input, not a weight
        weights = _weights(w_shape)[1:]
    else:
        mod = _conv_module(x_shape, w_shape, **attrs)
        weights = _weights(w_shape)
    new, named, count = conv1x1_as_matmul(mod, weights)
    assert count == 0
    tvm.ir.assert_structural_equal(new, mod)
    assert [a.shape for _, a in named] == [a.shape for _, a in weights]


def test_output_sizes_the_template_would_pad_are_left_alone():
    spec = get_target("host")
    fits = tile_fits(spec)
    lanes = spec.vector_bits // 32
    assert fits(56 * 56) and fits(lanes * 7)
    assert not fits(49)  # a 7x7 output: 49 columns are no whole number of vectors
    mod = _conv_module((1, 8, 7, 7), (4, 8, 1, 1))
    assert conv1x1_as_matmul(mod, _weights((4, 8, 1, 1)), columns_ok=fits)[2] == 0


def test_gemm_kernel_fuses_the_epilogue_and_reshapes_are_views():
    """After the pipeline: one matmul kernel with the multiply and ReLU fused, and no reshape copy kernel
    (the GEMM's input and output are views of the NCHW tensors; a pool reads the output)."""
    from edgecc.ir_passes.pipeline import relax_pipeline

    spec = get_target("host")
    mod = _conv_module((1, 64, 16, 16), (32, 64, 1, 1), pool=True)
    new, named, _ = conv1x1_as_matmul(mod, _weights((32, 64, 1, 1)))
    lowered = relax_pipeline(spec)(new)
    called = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar):
            called.add(expr.op.name_hint)

    relax.analysis.post_order_visit(lowered["main"].body, visit)
    kernels = {n for n in called if isinstance(lowered[n], tirx.PrimFunc)}
    assert kernels == {"fused_matmul_multiply_relu", "max_pool2d"}, kernels
    script = lowered["main"].script()
    assert script.count("vm.builtin.reshape") >= 2  # x -> [ci, P] and the result back to NCHW: views


def _onnx_model(path, ci, co, h, w, stride, residual):
    """Conv 1x1 (+ bias) -> BatchNormalization -> [+ x] -> Relu, random weights."""
    rng = np.random.default_rng(ci * 100 + co + h + w + stride)
    inits = [numpy_helper.from_array(rng.standard_normal((co, ci, 1, 1)).astype(F32), "w"),
             numpy_helper.from_array(rng.standard_normal(co).astype(F32), "b")]
    for name, arr in (("g", rng.random(co) + 0.5), ("beta", rng.standard_normal(co)),
                      ("mean", rng.standard_normal(co)), ("var", rng.random(co) + 0.5)):
        inits.append(numpy_helper.from_array(arr.astype(F32), name))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1], strides=[stride, stride]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"])]
    last = "n"
    if residual:
        nodes.append(helper.make_node("Add", ["n", "x"], ["a"]))
        last = "a"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    graph = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, ho, wo])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("ci,co,h,w,stride,residual", [
    (3, 5, 7, 7, 1, False),
    (3, 5, 13, 9, 2, False),
    (16, 16, 13, 9, 1, True),  # residual add and ReLU on the GEMM's [co, P] side
    (24, 40, 16, 16, 1, False),  # 256 columns: what a default build rewrites
    (8, 32, 32, 32, 2, False),
])
def test_build_matches_onnxruntime(tmp_path, monkeypatch, ci, co, h, w, stride, residual):
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    monkeypatch.setenv("EDGECC_CONV1X1_GEMM", "all")  # every output size, odd ones too
    path = tmp_path / "pw.onnx"
    _onnx_model(path, ci, co, h, w, stride, residual)
    result = build_artifact(str(path), str(tmp_path / "out"), target="host")
    assert [co, ci] in [p["shape"] for p in result.manifest["params"]]  # rewritten: the weight is [co, ci]
    x = np.random.default_rng(7).standard_normal((1, ci, h, w)).astype(F32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = load_artifact(tmp_path / "out").run({"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_switch_off(tmp_path, monkeypatch):
    from edgecc.build import build_artifact

    monkeypatch.setenv("EDGECC_CONV1X1_GEMM", "0")
    path = tmp_path / "pw.onnx"
    _onnx_model(path, 24, 40, 16, 16, 1, False)
    result = build_artifact(str(path), str(tmp_path / "out"), target="host")
    assert [40, 24, 1, 1] in [p["shape"] for p in result.manifest["params"]]


def test_weight_read_elsewhere_keeps_its_shape():
    """A weight that something else reads too stays [co, ci, 1, 1]; the GEMM reads a view of it."""
    co, ci = 6, 4
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, ci, 8, 8], F32))
    w = relax.Var("w", relax.TensorType([co, ci, 1, 1], F32))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(R.nn.relu(R.nn.conv2d(x, w)))
            out = bb.emit_output(R.add(R.sum(y), R.sum(w)))
        bb.emit_func_output(out)
    mod = bb.get()
    wv = np.random.default_rng(3).standard_normal((co, ci, 1, 1)).astype(F32)
    new, named, count = conv1x1_as_matmul(mod, [("w", wv)])
    assert count == 1 and named[0][1].shape == (co, ci, 1, 1)
    xv = np.random.default_rng(4).standard_normal((1, ci, 8, 8)).astype(F32)
    outs = []
    for m in (mod, new):
        vm = relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(wv)).numpy())
    ref = np.maximum(np.einsum("oc,chw->ohw", wv[:, :, 0, 0].astype(np.float64), xv[0].astype(np.float64)), 0).sum()
    np.testing.assert_allclose(outs[1], ref + wv.sum(dtype=np.float64), rtol=1e-5)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5)
