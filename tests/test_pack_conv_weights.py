"""Build-time conv weight panels (`edgecc.ir_passes.pack_conv_weights`): the IR before -> after, the
convolutions it must leave alone, the kernel it leads to (scheduled, epilogue fused, no run-time pack), and
results checked against numpy float64 and onnxruntime, on the host and under qemu for arm-neon."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import tvm_ffi  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from edgecc.ir_passes.pack_conv_weights import (  # noqa: E402
    conv2d_panels_primfunc, pack_conv_panels, pack_conv_weights)
from edgecc.ir_passes.pipeline import relax_pipeline  # noqa: E402
from edgecc.schedules.params import cpu_params  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402
from tests.test_conv1x1_as_matmul import _conv_module, _weights  # noqa: E402  (relu(conv * s), its weights)
from tests.test_prefetch import _prefetch_calls  # noqa: E402  ([(buffer shape, for writing, under an if)])

R = relax.op
F32 = "float32"
HOST = get_target("host")


def _conv_ref64(x, w, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1)):
    """NCHW conv in float64, straight from the definition (pad = top, left, bottom, right)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    w = w.astype(np.float64)
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, co, oh, ow))
    for ry in range(kh):
        for rx in range(kw):
            y0, x0 = ry * dilation[0], rx * dilation[1]
            win = x[:, :, y0:y0 + stride[0] * (oh - 1) + 1:stride[0], x0:x0 + stride[1] * (ow - 1) + 1:stride[1]]
            out += np.einsum("nchw,oc->nohw", win, w[:, :, ry, rx])
    return out


def test_panels_layout():
    """Panel p, row (c, ry, rx), lane j holds W[p*nr + j, c, ry, rx]."""
    w = np.arange(8 * 3 * 2 * 2, dtype=np.float32).reshape(8, 3, 2, 2)
    p = pack_conv_panels(w, 4)
    assert p.shape == (2, 3, 2, 2, 4) and p.flags["C_CONTIGUOUS"]
    for f in range(8):
        for c in range(3):
            assert p[f // 4, c, 1, 0, f % 4] == w[f, c, 1, 0]


def _expected_module(x_shape, w_shape, padding, out_shape, subsample=None):
    """What `pack_conv_weights` should make of `_conv_module`: [strided_slice(x) when `subsample`,] the panel
    conv (strides 1) on it, then the scale and ReLU."""
    co, ci, kh, kw = w_shape
    nr = cpu_params(HOST).nr(32)
    conv_x_shape = list(x_shape) if subsample is None else [*x_shape[:2], *(-(-d // st) for d, st in
                                                                          zip(x_shape[2:], subsample))]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(x_shape), F32))
    wp = relax.Var("w_panels", relax.TensorType([co // nr, ci, kh, kw, nr], F32))
    s = relax.Var("s", relax.TensorType([co], F32))
    kernel = bb.add_func(conv2d_panels_primfunc(conv_x_shape, co, kh, kw, nr, [1, 1], padding, [1, 1], F32),
                         "conv2d_panels")
    with bb.function("main", [x, wp, s], attrs={"num_input": 1}):
        with bb.dataflow():
            src = x
            if subsample is not None:
                src = bb.emit(R.strided_slice(x, axes=[2, 3], begin=[0, 0], end=list(x_shape[2:]), strides=subsample))
            y = bb.emit(relax.call_tir(kernel, [src, wp], relax.TensorType(list(out_shape), F32)))
            y = bb.emit(R.multiply(y, R.reshape(s, [1, co, 1, 1])))
            y = bb.emit(R.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_ir_before_after():
    """conv2d(x, w) * s -> relu  ==>  call_tir(conv2d_panels, (x, w_panels)) * s -> relu; w stored as panels."""
    x_shape, w_shape = (1, 8, 9, 7), (64, 8, 3, 3)
    mod = _conv_module(x_shape, w_shape, padding=[1, 1])
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, HOST)
    assert count == 1
    tvm.ir.assert_structural_equal(new, _expected_module(x_shape, w_shape, [1, 1, 1, 1], (1, 64, 9, 7)))
    np.testing.assert_array_equal(named[0][1], pack_conv_panels(weights[0][1], cpu_params(HOST).nr(32)))
    np.testing.assert_array_equal(named[1][1], weights[1][1])


def test_strided_1x1_conv_subsamples_first():
    """conv2d(x, w, strides=(2, 3)) with a 1x1 kernel  ==>  strided_slice(x, ::2, ::3), then the panel conv
    with strides 1 on the subsampled input; results against float64 on odd sizes."""
    x_shape, w_shape = (1, 24, 15, 13), (64, 24, 1, 1)
    mod = _conv_module(x_shape, w_shape, strides=[2, 3])
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, HOST)
    assert count == 1
    tvm.ir.assert_structural_equal(new, _expected_module(x_shape, w_shape, [0, 0, 0, 0], (1, 64, 8, 5), [2, 3]))
    xv = np.random.default_rng(6).standard_normal(x_shape).astype(F32)
    got = _build_and_run(new, [xv] + [a for _, a in named])
    ref = _conv_ref64(xv, weights[0][1], (2, 3))
    np.testing.assert_allclose(got, np.maximum(ref * weights[1][1].reshape(1, -1, 1, 1), 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["grouped", "nhwc", "weight_not_param", "read_elsewhere", "odd_channels"])
def test_not_rewritten(case):
    x_shape, w_shape, attrs = (1, 8, 6, 6), (32, 8, 3, 3), {}
    if case == "grouped":
        w_shape, attrs = (32, 4, 3, 3), {"groups": 2}
    elif case == "nhwc":
        x_shape, w_shape = (1, 6, 6, 8), (32, 3, 3, 8)
        attrs = {"data_layout": "NHWC", "kernel_layout": "OHWI", "epilogue": False}
    elif case == "odd_channels":
        w_shape = (20, 8, 3, 3)  # no whole tile of vectors divides 20: the run-time path pads it
    mod = _conv_module(x_shape, w_shape, **attrs)
    weights = _weights(w_shape)
    if case == "weight_not_param":
        mod["main"] = mod["main"].with_attr("num_input", 2)
        weights = weights[1:]
    elif case == "read_elsewhere":
        func = mod["main"]
        bb = relax.BlockBuilder()
        x, w, s = func.params
        with bb.function("main", [x, w, s], attrs={"num_input": 1}):
            with bb.dataflow():
                y = bb.emit(R.nn.conv2d(x, w))
                out = bb.emit_output(R.add(R.sum(y), R.sum(w)))
            bb.emit_func_output(out)
        mod = bb.get()
    new, named, count = pack_conv_weights(mod, weights, HOST)
    assert count == 0
    tvm.ir.assert_structural_equal(new, mod)


def _build_and_run(mod, arrays, spec=HOST):
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 8, 9, 7), (64, 8, 3, 3), {"padding": [1, 1]}),
    ((1, 3, 23, 19), (32, 3, 7, 7), {"padding": [3, 3], "strides": [2, 2]}),  # a stem, odd sizes
    ((1, 17, 11, 13), (48, 17, 3, 3), {"padding": [0, 1, 2, 1], "dilation": [2, 1]}),  # asymmetric pad
    ((1, 40, 7, 7), (96, 40, 1, 1), {}),  # a 7x7 1x1 conv (left to this pass by conv1x1_as_matmul)
    ((2, 5, 6, 5), (16, 5, 2, 3), {"strides": [1, 2]}),  # batch 2, one vector of channels
])
def test_kernel_matches_float64(x_shape, w_shape, attrs):
    """The packed conv, through the whole pipeline, against float64; the kernel is the conv2d rule's with the
    epilogue fused and no run-time pack stage."""
    mod = _conv_module(x_shape, w_shape, **attrs)
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, HOST)
    assert count == 1
    lowered = relax_pipeline(HOST)(new)
    convs = [f for gv, f in lowered.functions_items()
             if isinstance(f, tirx.PrimFunc) and "conv2d_panels" in gv.name_hint]
    assert len(convs) == 1 and str(convs[0].attrs["edgecc.schedule"]) == "conv2d"
    assert "relu" in [gv.name_hint for gv, f in lowered.functions_items() if f.same_as(convs[0])][0]
    stores = []
    tvm_ffi.structural_walk(convs[0].body, (tirx.BufferStore, lambda n: stores.append(n.buffer.name)), order="pre")
    assert not any("global" in name for name in stores), stores  # no cache_read pack of the weight
    x = np.random.default_rng(1).standard_normal(x_shape).astype(F32)
    got = _build_and_run(new, [x] + [a for _, a in named])
    pad = attrs.get("padding", [0, 0])
    pad = pad * 2 if len(pad) == 2 else pad
    ref = _conv_ref64(x, weights[0][1], attrs.get("strides", (1, 1)), pad, attrs.get("dilation", (1, 1)))
    ref = np.maximum(ref * weights[1][1].reshape(1, -1, 1, 1), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 24, 7, 9), (250, 24, 3, 3), {"padding": [1, 1]}),  # 250 -> 256 channels: 8 panels
    ((1, 40, 13, 13), (1000, 40, 1, 1), {}),  # SqueezeNet's classifier: 1000 -> 1024
])
def test_odd_channel_count_padded_to_whole_panels(x_shape, w_shape, attrs):
    """A channel count no whole tile of vectors divides gets zero channels up to the next tile (at most 1/8
    more work): the kernel computes them, a strided_slice keeps the real ones; against float64."""
    mod = _conv_module(x_shape, w_shape, **attrs)
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, HOST)
    assert count == 1
    nr = cpu_params(HOST).nr()
    co = w_shape[0]
    panels = named[0][1]
    assert panels.shape == (-(-co // nr), *w_shape[1:], nr)
    np.testing.assert_array_equal(panels.transpose(0, 4, 1, 2, 3).reshape(-1, *w_shape[1:])[co:], 0)
    assert "strided_slice" in new["main"].script()
    x = np.random.default_rng(6).standard_normal(x_shape).astype(F32)
    got = _build_and_run(new, [x] + [a for _, a in named])
    pad = attrs.get("padding", [0, 0]) * 2
    ref = _conv_ref64(x, weights[0][1], (1, 1), pad)
    np.testing.assert_allclose(got, np.maximum(ref * weights[1][1].reshape(1, -1, 1, 1), 0), rtol=1e-4, atol=1e-4)


def _panel_conv_with(monkeypatch, x_shape, w_shape, attrs, **params):
    """(packed module, its named weights, the original weights, the scheduled panel conv PrimFunc) with the
    host's CpuParams fields in `params` replaced."""
    import dataclasses

    import edgecc.schedules as schedules

    base_params = schedules.cpu_params
    monkeypatch.setattr(schedules, "cpu_params", lambda spec: dataclasses.replace(base_params(spec), **params))
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(_conv_module(x_shape, w_shape, **attrs), weights, HOST)
    assert count == 1
    (conv,) = [f for gv, f in relax_pipeline(HOST)(new).functions_items()
               if isinstance(f, tirx.PrimFunc) and "conv2d_panels" in gv.name_hint]
    assert str(conv.attrs["edgecc.schedule"]) == "conv2d"
    return new, named, weights, conv


def _check_float64(new, named, weights, x_shape, attrs, seed):
    """The packed module's output against the float64 conv, scale and ReLU."""
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(F32)
    got = _build_and_run(new, [x] + [a for _, a in named])
    pad = attrs.get("padding", [0, 0]) * 2
    ref = _conv_ref64(x, weights[0][1], attrs.get("strides", (1, 1)), pad)
    np.testing.assert_allclose(got, np.maximum(ref * weights[1][1].reshape(1, -1, 1, 1), 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 37, 7, 5), (288, 37, 3, 3), {"padding": [1, 1]}),  # prime channels: chunks of one channel (9 steps)
    ((1, 300, 7, 7), (256, 300, 1, 1), {}),  # chunks of 100 channels; the last panel's next chunk is past the end
    ((2, 50, 5, 3), (320, 50, 3, 3), {"padding": [1, 1], "strides": [1, 2]}),  # batch 2, 3-wide rows
])
@pytest.mark.parametrize("ahead", [1, 0])
def test_k_blocked_panels_prefetch_the_next_chunk(x_shape, w_shape, attrs, ahead, monkeypatch):
    """A K-blocked conv over build-time panels prefetches its next weight chunk (`schedules.prefetch`) unless
    the target's params say 0 chunks ahead; results against float64 either way."""
    new, named, weights, conv = _panel_conv_with(monkeypatch, x_shape, w_shape, attrs, kblock_prefetch_ahead=ahead)
    assert (len(_prefetch_calls(conv)) > 0) == bool(ahead)
    _check_float64(new, named, weights, x_shape, attrs, seed=3)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 300, 7, 7), (256, 300, 1, 1), {}),  # the input itself is the chunked operand
    ((1, 64, 6, 5), (256, 64, 3, 3), {"padding": [1, 1]}),  # its zero-padded copy is
])
@pytest.mark.parametrize("on", [True, False])
def test_k_blocked_panels_prefetch_their_input(x_shape, w_shape, attrs, on, monkeypatch):
    """A K-blocked conv (batch 1) also prefetches the next chunk of its input channels, only in the first panel
    of each core's share (under an `if`), unless the params turn it off; the weight prefetches stay either
    way. Results against float64."""
    new, named, weights, conv = _panel_conv_with(monkeypatch, x_shape, w_shape, attrs, kblock_prefetch_input=on)
    calls = _prefetch_calls(conv)
    panel_shape = tuple(named[0][1].shape)
    assert {c for c in calls if c[0] == panel_shape} == {(panel_shape, False, False)}  # weights: always
    pad = attrs.get("padding", [0, 0])
    input_shape = (1, x_shape[1], x_shape[2] + 2 * pad[0], x_shape[3] + 2 * pad[1])
    inputs = {c for c in calls if c[0] != panel_shape}
    assert inputs == ({(input_shape, False, True)} if on else set())
    _check_float64(new, named, weights, x_shape, attrs, seed=5)


@pytest.mark.cross
def test_neon_under_qemu(neon_runs, tmp_path):
    from tests.test_schedules import run_on_neon

    neon = get_target("arm-neon")
    x_shape, w_shape = (1, 13, 9, 11), (24, 13, 3, 3)
    mod = _conv_module(x_shape, w_shape, padding=[1, 1], strides=[2, 1])
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, neon)
    assert count == 1
    assert named[0][1].ndim == 5 and 24 % named[0][1].shape[-1] == 0
    new["main"] = new["main"].without_attr("num_input")
    x = np.random.default_rng(2).standard_normal(x_shape).astype(F32)
    got = run_on_neon(new, [x] + [a for _, a in named], tmp_path)
    ref = np.maximum(_conv_ref64(x, weights[0][1], (2, 1), (1, 1, 1, 1)) * weights[1][1].reshape(1, -1, 1, 1), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cross
def test_k_blocked_panels_prefetch_neon_under_qemu(neon_runs, tmp_path):
    """The prefetching K-blocked conv on arm-neon (8-wide panels, 17 of them; 3 chunks of 40 channels x 3x3;
    `llvm.prefetch` becomes PRFM), run under qemu against float64."""
    from tests.test_schedules import run_on_neon

    neon = get_target("arm-neon")
    x_shape, w_shape = (1, 120, 5, 6), (136, 120, 3, 3)
    mod = _conv_module(x_shape, w_shape, padding=[1, 1])
    weights = _weights(w_shape)
    new, named, count = pack_conv_weights(mod, weights, neon)
    assert count == 1
    (conv,) = [f for gv, f in relax_pipeline(neon)(new).functions_items()
               if isinstance(f, tirx.PrimFunc) and "conv2d_panels" in gv.name_hint]
    assert len(_prefetch_calls(conv)) > 0
    new["main"] = new["main"].without_attr("num_input")
    x = np.random.default_rng(4).standard_normal(x_shape).astype(F32)
    got = run_on_neon(new, [x] + [a for _, a in named], tmp_path)
    ref = np.maximum(_conv_ref64(x, weights[0][1], (1, 1), (1, 1, 1, 1)) * weights[1][1].reshape(1, -1, 1, 1), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _onnx_block(path, ci, co, h, w):
    """Conv 3x3 (+ bias) -> BatchNormalization -> + residual -> Relu, random weights (a ResNet block's end)."""
    rng = np.random.default_rng(ci + co + h + w)
    inits = [numpy_helper.from_array(rng.standard_normal((co, ci, 3, 3)).astype(F32), "w"),
             numpy_helper.from_array(rng.standard_normal(co).astype(F32), "b"),
             numpy_helper.from_array(rng.standard_normal((1, co, h, w)).astype(F32), "res")]
    for name, arr in (("g", rng.random(co) + 0.5), ("beta", rng.standard_normal(co)),
                      ("mean", rng.standard_normal(co)), ("var", rng.random(co) + 0.5)):
        inits.append(numpy_helper.from_array(arr.astype(F32), name))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"]),
             helper.make_node("Add", ["n", "res"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "blk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, co, h, w])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("pack", ["1", "0"])
def test_build_matches_onnxruntime(tmp_path, monkeypatch, pack):
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    monkeypatch.setenv("EDGECC_PACK_CONV", pack)
    ci, co, h, w = 19, 64, 13, 11
    path = tmp_path / "blk.onnx"
    _onnx_block(path, ci, co, h, w)
    result = build_artifact(str(path), str(tmp_path / "out"), target="host")
    nr = cpu_params(HOST).nr(32)
    shapes = [p["shape"] for p in result.manifest["params"]]
    assert ([co // nr, ci, 3, 3, nr] in shapes) == (pack == "1"), shapes
    x = np.random.default_rng(7).standard_normal((1, ci, h, w)).astype(F32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = load_artifact(tmp_path / "out").run({"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
