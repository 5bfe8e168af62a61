"""Quantized convolutions (`edgecc.quantized_conv2d`): the pass rewrites NCHW conv2d with weight parameters,
legalization gives one direct conv kernel reading the packed weight, and a quantized build equals
onnxruntime running the same ONNX with the weights replaced by their dequantized values (the independent
reference: the only difference left is the quantization itself; for w8a8 the input is put on its per-image
int8 grid in numpy first)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from edgecc.build import build_artifact
from edgecc.compress.recipe import Recipe
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
    # after legalization: one call_tir to one direct conv kernel that reads the packed int8 weight and
    # writes NCHW itself (no im2col buffer, no transpose / reshape on the Relax side)
    from edgecc.ir_passes.compression import KERNEL_ATTR, annotated_kernels

    with tvm.target.Target("llvm"):
        legal = relax.transform.LegalizeOps()(res.mod)
    kernels = annotated_kernels(legal)
    assert len(kernels) == 1, legal
    (name, kattrs), = kernels.items()
    assert kattrs["scheme"] == "w8" and kattrs["kernel"] == [3, 3] and "name" not in kattrs
    func = legal[name]
    assert [str(p.ty.dtype) for p in func.params] == ["float32", "int8", "float32", "float32"]
    assert [int(d) for d in func.params[-1].ty.shape] == [1, 64, 5, 5]
    assert bool(func.attrs["tirx.is_scheduled"]) and KERNEL_ATTR in func.attrs
    main_text = legal["main"].script()
    assert main_text.count("R.call_tir") == 1 and "permute_dims" not in main_text and "reshape" not in main_text
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


def test_1x1_conv_legalizes_to_weight_decode_and_matmul():
    """IR after legalization of a 1x1 stride-1 conv whose H*W is a multiple of the vector: a decode kernel
    (the only kernel reading the packed weight, [O, C] float out) and a plain Relax matmul (the default
    Matmul rule schedules it, with the conv's epilogue fused); other convs stay one direct kernel."""
    import tvm
    from tvm import relax

    from edgecc.compress.quantize import quantize_weights
    from edgecc.ir_passes.compression import annotated_kernels
    from edgecc.targets.registry import get_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((128, 64, 1, 1), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w)))
        bb.emit_func_output(y)
    weight = np.random.default_rng(0).standard_normal((128, 64, 1, 1)).astype(np.float32)
    res = quantize_weights(bb.get(), [("w", weight)], "w4g32")
    with get_target("host").tvm():
        legal = relax.transform.LegalizeOps()(res.mod)
    (name, kattrs), = annotated_kernels(legal).items()
    assert name.startswith("qconv2d_decode_") and kattrs["scheme"] == "w4g32"
    func = legal[name]
    assert [str(p.ty.dtype) for p in func.params] == ["uint32", "float32", "float32"]
    assert [int(d) for d in func.params[-1].ty.shape] == [128, 64]
    kernels = [gv.name_hint for gv, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "matmul" in kernels and not any(k.startswith("qconv2d_w4") for k in kernels), kernels


# ------------------------------------------------------------------------------------------ odd shapes


def _conv_onnx(path, c, o, k, stride, pad, dil, weight):
    from onnx import TensorProto, helper

    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[stride] * 2,
                            pads=[pad] * 4, dilations=[dil] * 2)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _per_image_int8_grid(x):
    """w8a8's input grid for a conv: one scale max|x| / 127 per image."""
    sx = np.abs(x).reshape(x.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1) / 127.0
    return (np.clip(np.round(x / sx), -127, 127) * sx).astype(np.float32)


# (N, C, H, O, kernel, stride, pad, dilation): odd channels (3, 17), widths 7 / 13, stride 2, 1x1 / 3x3 / 7x7,
# an output-channel count no vector tile divides (17), dilation, batch 2
# 1x1 stride-1 convs with H*W a multiple of the vector (8x8 here) take the matmul form (decode + matmul)
_CASES = [(1, 3, 13, 17, 7, 2, 3, 1), (1, 17, 7, 32, 3, 1, 1, 1), (2, 17, 13, 48, 1, 2, 0, 1),
          (1, 32, 7, 64, 1, 1, 0, 1), (1, 64, 13, 64, 3, 2, 1, 1), (1, 16, 13, 32, 3, 1, 2, 2),
          (1, 17, 8, 32, 1, 1, 0, 1), (2, 64, 8, 48, 1, 1, 0, 1)]


@pytest.mark.parametrize("scheme", ["w8", "w4g32", "w4g32-asym", "w8a8"])
@pytest.mark.parametrize("case", _CASES, ids=lambda c: "n{}c{}h{}o{}k{}s{}p{}d{}".format(*c))
def test_direct_conv_kernel_matches_onnxruntime(tmp_path, scheme, case):
    """The legalized kernel, compiled with edgecc's pipeline for the host, vs onnxruntime's Conv on the
    dequantized weight (w4g32 falls back to w8 where C*k*k is not a multiple of 32)."""
    import tvm
    from tvm import relax

    from edgecc.compress.quantize import quantize_weights
    from edgecc.ir_passes.compression import annotated_ops
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.targets.registry import get_target

    n, c, h, o, k, stride, pad, dil = case
    rng = np.random.default_rng(sum(case))
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    wv = relax.Var("w", relax.TensorType(weight.shape, "float32"))
    with bb.function("main", [xv, wv], attrs={"num_input": 1}):
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(xv, wv, strides=stride, padding=pad, dilation=dil)))
    recipe = Recipe(default=parse_scheme(scheme), min_params=0, source=scheme)
    res = quantize_weights(bb.get(), [("w", weight)], recipe)
    (op,) = annotated_ops(res.mod)
    used = parse_scheme(op["scheme"])
    fits = parse_scheme(scheme).check_shape(c * k * k, o) is None
    assert used.name == (parse_scheme(scheme).name if fits else "w8"), op
    spec = get_target("host")
    ex = tvm.compile(res.mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for _, a in res.params]).numpy()

    deq = quantize_rtn(weight.reshape(o, -1).T, used).dequantize().T.reshape(weight.shape).astype(np.float32)
    _conv_onnx(tmp_path / "conv.onnx", c, o, k, stride, pad, dil, deq)
    x_ref = _per_image_int8_grid(x) if used.act_bits else x
    ref = ort.InferenceSession(str(tmp_path / "conv.onnx")).run(None, {"x": x_ref})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("scheme", ["w8", "w4g32-asym"])
def test_arm_neon_quantized_conv_under_qemu(cnn_onnx, tmp_path, scheme):
    """The same kernels cross-built for AArch64 NEON (128-bit vectors: other tiles), run under qemu."""
    from edgecc.runtime_bridge.emulated import run_emulated
    from edgecc.targets.registry import get_target

    spec = get_target("arm-neon")
    status = spec.sdk_status()
    if not status.can_build:
        pytest.skip("no aarch64 cross toolchain")
    out = tmp_path / "arm"
    result = build_artifact(cnn_onnx, out, target="arm-neon", quantize=scheme)
    ops = [op for op in result.manifest["compression"]["annotated_ops"] if op["op"] == "conv"]
    assert len(ops) == 4
    if not status.can_run:
        pytest.skip("built; no qemu-aarch64 runtime to run it")
    x = np.random.default_rng(1).standard_normal((1, 3, 23, 19)).astype(np.float32)
    (got,) = run_emulated(out, spec, [x])
    ref_path, replaced = _dequantized_reference(cnn_onnx, {op["name"]: op["scheme"] for op in ops}, tmp_path)
    assert replaced == 4
    ref = ort.InferenceSession(str(ref_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
