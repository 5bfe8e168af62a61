"""edgecc's own ONNX converters (edgecc/frontend/converters) against onnxruntime, on generated models.

Each test builds a one-node model with `onnx.helper`, runs it in onnxruntime and through edgecc's frontend
+ pipeline on the host, and compares with the project's tolerance table (integer outputs exactly). Ops
whose converter is TVM's own (DynamicQuantizeLinear, MatMulInteger, FastGelu) are checked the same way so
that a regression in either importer shows here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

MS = "com.microsoft"


def _model(nodes, inputs, outputs, inits=(), opset=21, ms=False):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [h.make_opsetid("", opset)] + ([h.make_opsetid(MS, 1)] if ms else [])
    model = h.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _ort(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _edgecc(model, feeds):
    """edgecc's frontend + weight lifting + host pipeline, in process (what `edgecc validate` runs)."""
    import tvm
    from tvm import relax

    from edgecc.build import _run_weight_transforms, _split_transform_params
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.signature import read_signature
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.runtime_bridge.host import _flatten
    from edgecc.targets.registry import get_target

    spec = get_target("host")
    sig = read_signature(model)
    imported = import_model(model, sig)
    deploy, transform = _split_transform_params(imported.mod)
    weights = [w for _, w in imported.params]
    if transform is not None:
        weights = _run_weight_transforms(transform, weights)
    ex = relax.build(relax_pipeline(spec)(deploy), spec.tvm(), relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[t.name]) for t in sig.inputs] + [tvm.runtime.tensor(w) for w in weights]
    return [t.numpy() for t in _flatten(vm["main"](*args))]


def _check(model, feeds, n_outputs=None):
    from edgecc.runtime_bridge.verify import compare

    ref = _ort(model, feeds)
    got = _edgecc(model, feeds)
    n = n_outputs or len(ref)
    for i in range(n):
        assert got[i].dtype == ref[i].dtype, (i, got[i].dtype, ref[i].dtype)
        rep = compare(f"out{i}", got[i], ref[i])
        assert rep.passed, rep


def _vi(name, dtype, shape):
    return h.make_tensor_value_info(name, dtype, shape)


rng = np.random.default_rng(0)


# ------------------------------------------------------------------ QuantizeLinear / DequantizeLinear


@pytest.mark.parametrize("kind", ["tensor", "axis", "blocked"])
def test_dequantize_linear(kind):
    x = rng.integers(-128, 128, size=(4, 8)).astype(np.int8)
    if kind == "tensor":
        scale, zp, attrs = np.float32(0.05), np.int8(3), {}
    elif kind == "axis":
        scale = rng.uniform(0.01, 0.1, size=8).astype(np.float32)
        zp, attrs = rng.integers(-5, 5, size=8).astype(np.int8), {"axis": 1}
    else:
        scale = rng.uniform(0.01, 0.1, size=(4, 2)).astype(np.float32)
        zp, attrs = rng.integers(-5, 5, size=(4, 2)).astype(np.int8), {"axis": 1, "block_size": 4}
    node = h.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], **attrs)
    inits = [numpy_helper.from_array(np.asarray(scale), "s"), numpy_helper.from_array(np.asarray(zp), "zp")]
    model = _model([node], [_vi("x", T.INT8, [4, 8])], [_vi("y", T.FLOAT, [4, 8])], inits)
    _check(model, {"x": x})


@pytest.mark.parametrize("kind", ["tensor", "axis", "blocked"])
def test_quantize_linear(kind):
    # values on .5 after scaling check round-half-to-even; large ones check saturation
    x = np.concatenate([np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0, 0.0], np.float32),
                        rng.standard_normal(24).astype(np.float32) * 3]).reshape(4, 8)
    if kind == "tensor":
        scale, zp, attrs = np.float32(1.0), np.uint8(128), {}
        out_t, x = T.UINT8, x
    elif kind == "axis":
        scale = np.array([1, 1, 1, 1, 0.5, 0.25, 0.1, 1], np.float32)
        zp, attrs, out_t = np.array([0, 1, -1, 2, 0, 0, 3, -3], np.int8), {"axis": 1}, T.INT8
    else:
        scale = np.array([[1.0, 0.5], [0.25, 1.0], [0.1, 0.2], [1.0, 1.0]], np.float32)
        zp, attrs, out_t = np.array([[0, 1], [2, 3], [-4, 5], [0, 0]], np.int8), {"axis": 1, "block_size": 4}, T.INT8
    node = h.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], **attrs)
    inits = [numpy_helper.from_array(np.asarray(scale), "s"), numpy_helper.from_array(np.asarray(zp), "zp")]
    model = _model([node], [_vi("x", T.FLOAT, [4, 8])], [_vi("y", out_t, [4, 8])], inits)
    _check(model, {"x": x})


def test_dynamic_quantize_linear():
    node = h.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "zp"])
    model = _model([node], [_vi("x", T.FLOAT, [3, 16])],
                   [_vi("y", T.UINT8, [3, 16]), _vi("s", T.FLOAT, []), _vi("zp", T.UINT8, [])], opset=13)
    _check(model, {"x": rng.standard_normal((3, 16)).astype(np.float32)})


@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_integer(per_column):
    b = rng.integers(0, 255, size=(16, 8)).astype(np.uint8)
    bzp = rng.integers(100, 150, size=8).astype(np.uint8) if per_column else np.uint8(128)
    node = h.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"])
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.uint8(120), "azp"),
             numpy_helper.from_array(np.asarray(bzp), "bzp")]
    model = _model([node], [_vi("a", T.UINT8, [4, 16])], [_vi("y", T.INT32, [4, 8])], inits, opset=13)
    _check(model, {"a": rng.integers(0, 255, size=(4, 16)).astype(np.uint8)})


def test_qlinear_matmul():
    node = h.make_node("QLinearMatMul", ["a", "as", "azp", "b", "bs", "bzp", "ys", "yzp"], ["y"])
    inits = [numpy_helper.from_array(np.float32(0.02), "as"), numpy_helper.from_array(np.uint8(110), "azp"),
             numpy_helper.from_array(rng.integers(0, 255, size=(16, 8)).astype(np.uint8), "b"),
             numpy_helper.from_array(np.float32(0.03), "bs"), numpy_helper.from_array(np.uint8(130), "bzp"),
             numpy_helper.from_array(np.float32(0.5), "ys"), numpy_helper.from_array(np.uint8(100), "yzp")]
    model = _model([node], [_vi("a", T.UINT8, [4, 16])], [_vi("y", T.UINT8, [4, 8])], inits, opset=13)
    _check(model, {"a": rng.integers(0, 255, size=(4, 16)).astype(np.uint8)})


def test_qlinear_conv_per_channel():
    w = rng.integers(-100, 100, size=(4, 3, 3, 3)).astype(np.int8)
    node = h.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp", "b"], ["y"],
                       pads=[1, 1, 1, 1], strides=[1, 1])
    inits = [numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.uint8(120), "xzp"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.uniform(0.001, 0.01, 4).astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
             numpy_helper.from_array(np.float32(0.05), "ys"), numpy_helper.from_array(np.uint8(128), "yzp"),
             numpy_helper.from_array(rng.integers(-500, 500, 4).astype(np.int32), "b")]
    model = _model([node], [_vi("x", T.UINT8, [1, 3, 8, 8])], [_vi("y", T.UINT8, [1, 4, 8, 8])], inits, opset=13)
    _check(model, {"x": rng.integers(0, 255, size=(1, 3, 8, 8)).astype(np.uint8)})


# ------------------------------------------------------------------------------ com.microsoft ops


def _pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] small ints -> uint8 [..., n*bits/8], lowest bits first (onnxruntime's layout)."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per):
        out |= (q[..., i] << (i * bits)).astype(np.uint8)
    return out


@pytest.mark.parametrize("bits,with_zp,k", [(4, True, 64), (4, False, 48), (8, True, 32), (2, True, 64)])
def test_matmul_nbits(bits, with_zp, k):
    n, block = 16, 16
    k_blocks = (k + block - 1) // block
    q = rng.integers(0, 1 << bits, size=(n, k_blocks * block))
    b = _pack_nbits(q, bits).reshape(n, k_blocks, block * bits // 8)
    scales = rng.uniform(0.01, 0.05, size=n * k_blocks).astype(np.float32)
    ins = ["a", "b", "scales"] + (["zp"] if with_zp else [])
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "scales")]
    if with_zp:
        zq = rng.integers(0, 1 << bits, size=(n, k_blocks))
        per = 8 // bits
        zq = np.pad(zq, ((0, 0), (0, (-k_blocks) % per)))
        inits.append(numpy_helper.from_array(_pack_nbits(zq, bits).reshape(-1), "zp"))
    node = h.make_node("MatMulNBits", ins, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block)
    model = _model([node], [_vi("a", T.FLOAT, [3, k])], [_vi("y", T.FLOAT, [3, n])], inits, ms=True)
    _check(model, {"a": rng.standard_normal((3, k)).astype(np.float32)})


def test_matmul_nbits_artifact(tmp_path):
    """Through `build_artifact`: the dequantization is lifted to build time and the artifact runs."""
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    n, k, block = 8, 32, 32
    q = rng.integers(0, 16, size=(n, k))
    inits = [numpy_helper.from_array(_pack_nbits(q, 4).reshape(n, 1, 16), "b"),
             numpy_helper.from_array(rng.uniform(0.01, 0.05, n).astype(np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias")]
    node = h.make_node("MatMulNBits", ["a", "b", "scales", "", "", "bias"], ["y"], domain=MS, K=k, N=n, bits=4,
                       block_size=block)
    model = _model([node], [_vi("a", T.FLOAT, [2, k])], [_vi("y", T.FLOAT, [2, n])], inits, ms=True)
    path = tmp_path / "mmnb.onnx"
    onnx.save(model, str(path))
    build_artifact(path, tmp_path / "out", target="host")
    feeds = {"a": rng.standard_normal((2, k)).astype(np.float32)}
    got = load_artifact(tmp_path / "out").run(feeds)["y"]
    np.testing.assert_allclose(got, _ort(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_simplified_layer_norm():
    # onnxruntime registers it in the default domain (the ONNX checker does not know it: imported directly)
    node = h.make_node("SimplifiedLayerNormalization", ["x", "s"], ["y"], epsilon=1e-5, axis=-1)
    inits = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "s")]
    model = _model([node], [_vi("x", T.FLOAT, [2, 5, 32])], [_vi("y", T.FLOAT, [2, 5, 32])], inits, opset=17)
    _check(model, {"x": rng.standard_normal((2, 5, 32)).astype(np.float32)})


@pytest.mark.parametrize("outputs", [1, 4])
def test_skip_simplified_layer_norm(outputs):
    outs = ["y", "", "", "sum"][:outputs] if outputs > 1 else ["y"]
    node = h.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g", "bias"], outs, domain=MS,
                       epsilon=1e-6)
    inits = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bias")]
    vis = [_vi(o, T.FLOAT, [2, 5, 32]) for o in outs if o]
    model = _model([node], [_vi("x", T.FLOAT, [2, 5, 32]), _vi("skip", T.FLOAT, [2, 5, 32])], vis, inits,
                   opset=17, ms=True)
    _check(model, {"x": rng.standard_normal((2, 5, 32)).astype(np.float32),
                   "skip": rng.standard_normal((2, 5, 32)).astype(np.float32)})


def test_fast_gelu_with_bias():
    node = h.make_node("FastGelu", ["x", "bias"], ["y"], domain=MS)
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias")]
    model = _model([node], [_vi("x", T.FLOAT, [3, 16])], [_vi("y", T.FLOAT, [3, 16])], inits, opset=17, ms=True)
    _check(model, {"x": rng.standard_normal((3, 16)).astype(np.float32) * 3})


def test_layer_norm_mean_and_inv_std():
    node = h.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=-1, epsilon=1e-5)
    inits = [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    model = _model([node], [_vi("x", T.FLOAT, [3, 8])],
                   [_vi("y", T.FLOAT, [3, 8]), _vi("mean", T.FLOAT, [3, 1]), _vi("inv", T.FLOAT, [3, 1])], inits,
                   opset=17)
    _check(model, {"x": rng.standard_normal((3, 8)).astype(np.float32)})


def test_converters_can_be_disabled():
    from edgecc.frontend import converters

    assert converters.lookup("MatMulNBits", MS) is not None
    converters.set_enabled(False)
    try:
        assert converters.lookup("MatMulNBits", MS) is None
        assert "MatMulNBits" not in converters.op_types()
    finally:
        converters.set_enabled(True)
