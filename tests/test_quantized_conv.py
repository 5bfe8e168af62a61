"""Quantized convolutions (`edgecc.quantized_conv2d`): the pass rewrites NCHW conv2d with weight parameters,
and a quantized build equals onnxruntime running the same ONNX with the weights replaced by their dequantized
values (the independent reference: the only difference left is the quantization itself)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from edgecc.build import build_artifact
from edgecc.compress.rtn import quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.runtime_bridge.host import load_artifact


class _Cnn(torch.nn.Module):
    """Stride, padding, dilation, 1x1, a bias-free conv and a depthwise conv (which stays float)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 64, 5, stride=2, padding=1)  # 75 x 64 >= min_params
        self.c2 = torch.nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.c3 = torch.nn.Conv2d(64, 64, 1)
        self.c4 = torch.nn.Conv2d(64, 16, (3, 5), stride=(1, 2), padding=(0, 1))

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        return self.c4(torch.relu(self.c3(x)))


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qconv") / "cnn.onnx"
    torch.onnx.export(_Cnn().eval(), (torch.randn(1, 3, 23, 19),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    return path


def _dequantized_reference(path, schemes: dict[str, str], out_dir):
    """The ONNX model with each conv weight named in `schemes` replaced by quantize -> dequantize with its
    scheme (float64 -> fp32)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group != 1 or node.input[1] not in schemes:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        deq = quantize_rtn(w.reshape(w.shape[0], -1).T.astype(np.float32),
                           parse_scheme(schemes[node.input[1]])).dequantize()
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(deq.T.reshape(w.shape).astype(np.float32),
                                                              node.input[1]))
        replaced += 1
    ref_path = out_dir / "ref.onnx"
    onnx.save(model, str(ref_path))
    return ref_path, replaced


@pytest.mark.parametrize("scheme", ["w8", "w4g32-asym", "w8a8"])
def test_quantized_conv_matches_dequantized_onnxruntime(cnn_onnx, tmp_path, scheme):
    out = tmp_path / "art"
    result = build_artifact(cnn_onnx, out, target="host", quantize=scheme)
    ops = [op for op in result.manifest["compression"]["annotated_ops"] if op["op"] == "conv"]
    assert len(ops) == 4, result.manifest["compression"]  # the depthwise conv stays float
    # c1's K = 75 is not a multiple of 32: the recipe's fallback scheme takes it
    assert {op["scheme"] for op in ops} <= {parse_scheme(scheme).name, "w8"}, ops
    assert sum(op["scheme"] == parse_scheme(scheme).name for op in ops) >= 3, ops
    x = np.random.default_rng(1).standard_normal((1, 3, 23, 19)).astype(np.float32)
    (got,) = load_artifact(out).run({"x": x}).values()
    if scheme == "w8a8":  # activations are quantized per row as well: compare with the float model loosely
        ref = ort.InferenceSession(str(cnn_onnx)).run(None, {"x": x})[0]
        cos = float(np.dot(got.ravel(), ref.ravel()) / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos > 0.999, cos
        return
    ref_path, replaced = _dequantized_reference(cnn_onnx, {op["name"]: op["scheme"] for op in ops}, tmp_path)
    assert replaced == 4
    ref = ort.InferenceSession(str(ref_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and the weights really are stored packed: no float copy of a quantized conv weight
    assert not result.manifest["compression"]["kept_float_copies"]
    assert result.manifest["compression"]["packed_bytes"] < result.manifest["compression"]["orig_bytes"] / 3


def test_quantize_pass_rewrites_conv_ir():
    """IR before -> after: conv2d(x, W) becomes edgecc.quantized_conv2d(x, W.qweight, W.scales) with the
    geometry in its attrs; W leaves the parameter list."""
    import tvm
    from tvm import relax

    from edgecc.compress.quantize import quantize_weights
    from edgecc.ir_passes.compression import QUANT_CONV2D, annotated_ops

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((64, 16, 3, 3), "float32"))  # 144 x 64 >= the recipe's min_params
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1))
        bb.emit_func_output(y)
    mod = bb.get()
    weight = np.random.default_rng(0).standard_normal((64, 16, 3, 3)).astype(np.float32)
    res = quantize_weights(mod, [("w", weight)], "w8")
    ops = annotated_ops(res.mod)
    assert [op["op"] for op in ops] == [QUANT_CONV2D]
    assert ops[0]["strides"] == [2, 2] and ops[0]["padding"] == [1, 1, 1, 1] and ops[0]["kernel"] == [3, 3]
    assert ops[0]["in_features"] == 144 and ops[0]["out_features"] == 64
    assert [name for name, _ in res.params] == ["w.qweight", "w.scales"]
    assert "relax.nn.conv2d" not in res.mod["main"].script()
    # numerics of the legalized module vs numpy float64 on the dequantized weight
    ex = tvm.compile(res.mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = np.random.default_rng(1).standard_normal((1, 16, 9, 9)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xv), *[tvm.runtime.tensor(a) for _, a in res.params]).numpy()
    deq = quantize_rtn(weight.reshape(64, -1).T, parse_scheme("w8")).dequantize().T.reshape(weight.shape)
    xp = np.pad(xv.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((1, 64, 5, 5))
    for i in range(3):
        for j in range(3):
            ref += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 9:2, j:j + 9:2], deq[:, :, i, j])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
