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
from conftest import pack_low_bits_first

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




@pytest.mark.parametrize("bits,with_zp,k", [(4, True, 64), (4, False, 48), (8, True, 32), (2, True, 64)])
def test_matmul_nbits(bits, with_zp, k):
    n, block = 16, 16
    k_blocks = (k + block - 1) // block
    q = rng.integers(0, 1 << bits, size=(n, k_blocks * block))
    b = pack_low_bits_first(q, bits).reshape(n, k_blocks, block * bits // 8)
    scales = rng.uniform(0.01, 0.05, size=n * k_blocks).astype(np.float32)
    ins = ["a", "b", "scales"] + (["zp"] if with_zp else [])
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "scales")]
    if with_zp:
        zq = rng.integers(0, 1 << bits, size=(n, k_blocks))
        per = 8 // bits
        zq = np.pad(zq, ((0, 0), (0, (-k_blocks) % per)))
        inits.append(numpy_helper.from_array(pack_low_bits_first(zq, bits).reshape(-1), "zp"))
    node = h.make_node("MatMulNBits", ins, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block)
    model = _model([node], [_vi("a", T.FLOAT, [3, k])], [_vi("y", T.FLOAT, [3, n])], inits, ms=True)
    _check(model, {"a": rng.standard_normal((3, k)).astype(np.float32)})


def test_matmul_nbits_artifact(tmp_path):
    """Through `build_artifact`: the dequantization is lifted to build time and the artifact runs."""
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    n, k, block = 8, 32, 32
    q = rng.integers(0, 16, size=(n, k))
    inits = [numpy_helper.from_array(pack_low_bits_first(q, 4).reshape(n, 1, 16), "b"),
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


# ------------------------------------------------------------------ attention family


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["4d", "3d_gqa_causal", "bool_mask", "past_present", "softcap_mode3"])
def test_attention_standard(kind):
    b, hq, hkv, s, d = 2, 4, 4, 5, 8
    attrs, feeds, outs = {}, {}, ["y"]
    if kind == "3d_gqa_causal":
        hkv = 2
        attrs = {"q_num_heads": hq, "kv_num_heads": hkv, "is_causal": 1}
        feeds = {"q": _f32(b, s, hq * d), "k": _f32(b, s, hkv * d), "v": _f32(b, s, hkv * d)}
    else:
        feeds = {"q": _f32(b, hq, s, d), "k": _f32(b, hkv, s, d), "v": _f32(b, hkv, s, d)}
    names = ["q", "k", "v"]
    if kind == "bool_mask":
        feeds["m"] = rng.random((s, s)) < 0.7
        feeds["m"][:, 0] = True
        names.append("m")
    if kind == "past_present":
        feeds["pk"], feeds["pv"] = _f32(b, hkv, 3, d), _f32(b, hkv, 3, d)
        names += ["", "pk", "pv"]
        attrs = {"is_causal": 1}
        outs = ["y", "present_k", "present_v"]
    if kind == "softcap_mode3":
        attrs = {"softcap": 2.0, "qk_matmul_output_mode": 3, "scale": 0.5}
        outs = ["y", "", "", "qk"]
    node = h.make_node("Attention", names, outs, **attrs)
    inputs = [_vi(n, T.BOOL if n == "m" else T.FLOAT, list(feeds[n].shape)) for n in names if n]
    model = _model([node], inputs, [h.make_empty_tensor_value_info(o) for o in outs if o], opset=23)
    _check(model, feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot_dim", [0, 4])
def test_rotary_embedding_standard(interleaved, rot_dim):
    b, s, heads, d = 2, 3, 2, 8
    half = (rot_dim or d) // 2
    node = h.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], interleaved=interleaved,
                       num_heads=heads, rotary_embedding_dim=rot_dim)
    inits = [numpy_helper.from_array(_f32(16, half), "cos"), numpy_helper.from_array(_f32(16, half), "sin")]
    model = _model([node], [_vi("x", T.FLOAT, [b, s, heads * d]), _vi("pos", T.INT64, [b, s])],
                   [_vi("y", T.FLOAT, [b, s, heads * d])], inits, opset=23)
    _check(model, {"x": _f32(b, s, heads * d), "pos": rng.integers(0, 16, size=(b, s)).astype(np.int64)})


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_microsoft(interleaved):
    b, s, heads, d = 2, 3, 2, 8
    angles = np.arange(32)[:, None] * (1.0 / 10000 ** (np.arange(d // 2) / (d // 2)))[None, :]
    node = h.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain=MS, interleaved=interleaved,
                       num_heads=heads)
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    model = _model([node], [_vi("x", T.FLOAT, [b, s, heads * d]), _vi("pos", T.INT64, [b, s])],
                   [_vi("y", T.FLOAT, [b, s, heads * d])], inits, opset=17, ms=True)
    _check(model, {"x": _f32(b, s, heads * d), "pos": rng.integers(0, 32, size=(b, s)).astype(np.int64)})


@pytest.mark.parametrize("variant", ["plain", "mask_past_causal"])
def test_multi_head_attention(variant):
    b, s, heads, d = 2, 4, 2, 8
    hidden = heads * d
    feeds = {"q": _f32(b, s, hidden), "k": _f32(b, s, hidden), "v": _f32(b, s, hidden)}
    names, outs, attrs = ["q", "k", "v"], ["y"], {"num_heads": heads}
    if variant == "mask_past_causal":
        past = 3
        feeds["mask"] = np.ones((b, past + s), np.int32)
        feeds["mask"][1, :2] = 0
        feeds["pk"], feeds["pv"] = _f32(b, heads, past, d), _f32(b, heads, past, d)
        names += ["bias", "mask", "", "pk", "pv"]
        outs += ["present_k", "present_v"]
        attrs["unidirectional"] = 1
    inits = [numpy_helper.from_array(_f32(3 * hidden), "bias")] if "bias" in names else []
    node = h.make_node("MultiHeadAttention", names, outs, domain=MS, **attrs)
    inputs = [_vi(n, T.INT32 if n == "mask" else T.FLOAT, list(feeds[n].shape)) for n in names if n in feeds]
    model = _model([node], inputs, [h.make_empty_tensor_value_info(o) for o in outs], inits, opset=17, ms=True)
    _check(model, feeds)


@pytest.mark.parametrize("phase", ["prefill", "decode", "decode_rotary"])
def test_group_query_attention(phase):
    b, heads, kv_heads, d = 2, 4, 2, 16  # onnxruntime's rotary wants head_size % 16 == 0
    s, past = (5, 0) if phase == "prefill" else (1, 4)
    feeds = {"q": _f32(b, s, heads * d), "k": _f32(b, s, kv_heads * d), "v": _f32(b, s, kv_heads * d),
             "seqlens_k": np.full((b,), past + s - 1, np.int32), "total": np.array(past + s, np.int32)}
    names = ["q", "k", "v", "", "", "seqlens_k", "total"]
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    if past:
        feeds["pk"], feeds["pv"] = _f32(b, kv_heads, past, d), _f32(b, kv_heads, past, d)
        names[3:5] = ["pk", "pv"]
    inits = []
    if phase == "decode_rotary":
        angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(d // 2) / (d // 2)))[None, :]
        inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
                 numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
        names += ["cos", "sin"]
        attrs["do_rotary"] = 1
    node = h.make_node("GroupQueryAttention", names, ["y", "present_k", "present_v"], domain=MS, **attrs)
    dtypes = {"seqlens_k": T.INT32, "total": T.INT32}
    inputs = [_vi(n, dtypes.get(n, T.FLOAT), list(feeds[n].shape)) for n in names if n in feeds]
    outs = [h.make_empty_tensor_value_info(o) for o in ("y", "present_k", "present_v")]
    model = _model([node], inputs, outs, inits, opset=17, ms=True)
    _check(model, feeds)


def test_skip_layer_normalization():
    node = h.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"], domain=MS,
                       epsilon=1e-5)
    inits = [numpy_helper.from_array(_f32(16), n) for n in ("gamma", "beta", "bias")]
    model = _model([node], [_vi("x", T.FLOAT, [2, 3, 16]), _vi("skip", T.FLOAT, [2, 3, 16])],
                   [_vi("y", T.FLOAT, [2, 3, 16])], inits, opset=17, ms=True)
    _check(model, {"x": _f32(2, 3, 16), "skip": _f32(2, 3, 16)})


def test_bias_gelu():
    node = h.make_node("BiasGelu", ["x", "bias"], ["y"], domain=MS)
    inits = [numpy_helper.from_array(_f32(16), "bias")]
    model = _model([node], [_vi("x", T.FLOAT, [3, 16])], [_vi("y", T.FLOAT, [3, 16])], inits, opset=17, ms=True)
    _check(model, {"x": _f32(3, 16) * 3})


# ------------------------------------------------------------------ importer: constant folding


def test_import_folds_shape_arithmetic():
    """Shape -> Gather -> Concat -> Reshape and a computed ReduceMean axis reach TVM as constants."""
    nodes = [
        h.make_node("Shape", ["x"], ["shp"]),
        h.make_node("Gather", ["shp", "i0"], ["d0"], axis=0),
        h.make_node("Concat", ["d0", "minus1"], ["new_shape"], axis=0),
        h.make_node("Reshape", ["x", "new_shape"], ["flat"]),
        h.make_node("Size", ["shp"], ["rank"]),
        h.make_node("Sub", ["rank", "one"], ["last"]),
        h.make_node("Unsqueeze", ["last", "zero"], ["axes"]),
        h.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "zero")]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3, 4])], [_vi("flat", T.FLOAT, [2, 12]), _vi("mean", T.FLOAT, [2, 3])],
                   inits, opset=18)
    _check(model, {"x": _f32(2, 3, 4)})
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.signature import read_signature

    assert import_model(model, read_signature(model)).params == []  # small int64 inputs are not weights


def test_import_inlines_if_with_constant_condition():
    then_g = h.make_graph([h.make_node("Relu", ["x"], ["t"])], "then", [], [_vi("t", T.FLOAT, [3, 4])])
    else_g = h.make_graph([h.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", T.FLOAT, [3, 4])])
    nodes = [h.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(False))),
             h.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 4])], [_vi("y", T.FLOAT, [3, 4])], opset=18)
    _check(model, {"x": _f32(3, 4)})


# ------------------------------------------------------------------ float8 casts, losses, small ops


@pytest.mark.parametrize("to", [T.FLOAT8E4M3FN, T.FLOAT8E5M2])
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_float8_round_trip(to, saturate):
    x = np.concatenate([_f32(20) * 4, np.array([1000.0, -1000.0, 0.3125, 1e-7, 0.0], np.float32)])
    x = x.reshape(5, 5)
    nodes = [h.make_node("Cast", ["x"], ["f8"], to=to, saturate=saturate),
             h.make_node("Cast", ["f8"], ["y"], to=T.FLOAT)]
    model = _model(nodes, [_vi("x", T.FLOAT, [5, 5])], [_vi("y", T.FLOAT, [5, 5])], opset=21)
    if not saturate and to == T.FLOAT8E4M3FN:
        x[x > 448] = 300.0  # no inf in E4M3FN: keep NaN out of the comparison
        x[x < -448] = -300.0
    _check(model, {"x": x})


@pytest.mark.parametrize("op", ["SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_ops(op, reduction):
    x = _f32(3, 5, 2)
    if op == "NegativeLogLikelihoodLoss":
        x = np.log(np.exp(x) / np.exp(x).sum(1, keepdims=True)).astype(np.float32)
    target = rng.integers(0, 5, size=(3, 2)).astype(np.int64)
    target[0, 0] = -1
    node = h.make_node(op, ["x", "t", "w"], ["loss"], reduction=reduction, ignore_index=-1)
    inits = [numpy_helper.from_array(np.abs(_f32(5)) + 0.1, "w")]
    out_shape = [] if reduction == "mean" else [3, 2]
    model = _model([node], [_vi("x", T.FLOAT, [3, 5, 2]), _vi("t", T.INT64, [3, 2])],
                   [_vi("loss", T.FLOAT, out_shape)], inits, opset=13)
    _check(model, {"x": x, "t": target})


def test_one_hot_negative_indices():
    node = h.make_node("OneHot", ["i", "depth", "values"], ["y"], axis=1)
    inits = [numpy_helper.from_array(np.array(5, np.int64), "depth"),
             numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "values")]
    model = _model([node], [_vi("i", T.INT64, [2, 3])], [_vi("y", T.FLOAT, [2, 5, 3])], inits, opset=11)
    _check(model, {"i": np.array([[0, -1, 4], [2, -5, 1]], np.int64)})


def test_tensor_scatter_kv_update():
    node = h.make_node("TensorScatter", ["cache", "update", "idx"], ["y"], axis=2)
    model = _model([node], [_vi("cache", T.FLOAT, [2, 3, 8, 4]), _vi("update", T.FLOAT, [2, 3, 2, 4]),
                            _vi("idx", T.INT64, [2])], [_vi("y", T.FLOAT, [2, 3, 8, 4])], opset=24)
    feeds = {"cache": _f32(2, 3, 8, 4), "update": _f32(2, 3, 2, 4), "idx": np.array([1, 5], np.int64)}
    _check(model, feeds)


@pytest.mark.parametrize("op,attrs", [("LSTM", {"direction": "bidirectional"}), ("GRU", {"linear_before_reset": 1}),
                                      ("RNN", {"direction": "reverse"})])  # onnxruntime has no layout=1
def test_recurrent_ops(op, attrs):
    seq, batch, inp, hid = 4, 2, 3, 5
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    x_shape = [batch, seq, inp] if attrs.get("layout") else [seq, batch, inp]
    inits = [numpy_helper.from_array(_f32(dirs, gates * hid, inp) * 0.5, "W"),
             numpy_helper.from_array(_f32(dirs, gates * hid, hid) * 0.5, "R"),
             numpy_helper.from_array(_f32(dirs, 2 * gates * hid) * 0.5, "B")]
    node = h.make_node(op, ["x", "W", "R", "B"], ["y", "y_h"], hidden_size=hid, **attrs)
    model = _model([node], [_vi("x", T.FLOAT, x_shape)],
                   [h.make_empty_tensor_value_info("y"), h.make_empty_tensor_value_info("y_h")], inits, opset=14)
    _check(model, {"x": _f32(*x_shape)})


@pytest.mark.parametrize("inverse,onesided", [(0, 0), (0, 1), (1, 0)])
def test_dft(inverse, onesided):
    node = h.make_node("DFT", ["x", "", "axis"], ["y"], inverse=inverse, onesided=onesided)
    inits = [numpy_helper.from_array(np.array(1, np.int64), "axis")]
    comp = 2 if inverse else 1
    model = _model([node], [_vi("x", T.FLOAT, [2, 8, comp])], [h.make_empty_tensor_value_info("y")], inits, opset=20)
    _check(model, {"x": _f32(2, 8, comp)})


def test_scan_is_unrolled():
    """A cumulative sum written as Scan (opset 9+): the importer converts the body once per step."""
    body = h.make_graph([h.make_node("Add", ["s_in", "x_t"], ["s_out"]), h.make_node("Identity", ["s_out"], ["y_t"])],
                        "body", [_vi("s_in", T.FLOAT, [3]), _vi("x_t", T.FLOAT, [3])],
                        [_vi("s_out", T.FLOAT, [3]), _vi("y_t", T.FLOAT, [3])])
    node = h.make_node("Scan", ["init", "x"], ["final", "ys"], body=body, num_scan_inputs=1,
                       scan_input_directions=[1])
    model = _model([node], [_vi("init", T.FLOAT, [3]), _vi("x", T.FLOAT, [4, 3])],
                   [_vi("final", T.FLOAT, [3]), _vi("ys", T.FLOAT, [4, 3])], opset=16)
    _check(model, {"init": _f32(3), "x": _f32(4, 3)})


def test_loop_with_constant_trip_count_is_unrolled():
    body = h.make_graph([h.make_node("Identity", ["c_in"], ["c_out"]),
                         h.make_node("Cast", ["i"], ["i_f"], to=T.FLOAT),
                         h.make_node("Mul", ["acc_in", "i_f"], ["scaled"]),
                         h.make_node("Add", ["scaled", "x"], ["acc_out"]),
                         h.make_node("Identity", ["acc_out"], ["step"])],
                        "body", [_vi("i", T.INT64, []), _vi("c_in", T.BOOL, []), _vi("acc_in", T.FLOAT, [2])],
                        [_vi("c_out", T.BOOL, []), _vi("acc_out", T.FLOAT, [2]), _vi("step", T.FLOAT, [2])])
    node = h.make_node("Loop", ["trip", "cond", "acc0"], ["acc", "steps"], body=body)
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")]
    model = _model([node], [_vi("x", T.FLOAT, [2]), _vi("acc0", T.FLOAT, [2])],
                   [_vi("acc", T.FLOAT, [2]), _vi("steps", T.FLOAT, [3, 2])], inits, opset=16)
    _check(model, {"x": _f32(2), "acc0": _f32(2)})


# ------------------------------------------------------------------ sub-byte tensors (one element per byte)


def _check_reference(model, feeds):
    """Against onnx's reference evaluator (onnxruntime lacks int2/float4 casts); sub-byte values compared as
    their byte containers (edgecc.frontend.subbyte), exactly."""
    from onnx.reference import ReferenceEvaluator

    from edgecc.frontend.subbyte import to_container

    ref = ReferenceEvaluator(model).run(None, feeds)
    got = _edgecc(model, {k: to_container(v) for k, v in feeds.items()})
    for r, g in zip(ref, got):
        r = to_container(np.asarray(r))
        assert g.dtype == r.dtype and g.shape == r.shape, (g.dtype, r.dtype, g.shape, r.shape)
        np.testing.assert_array_equal(g.view(np.uint8) if g.dtype == np.uint8 else g, r)


_EDGES = np.array([-9, -8.5, -2.7, -2.5, -0.5, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, 100, 1e-7, -1e-7,
                   np.nan, -np.nan, np.inf, -np.inf, 6.5], np.float32)


@pytest.mark.parametrize("to", [T.INT4, T.UINT4, T.INT2, T.UINT2, T.FLOAT4E2M1])
def test_cast_to_subbyte_and_back(to):
    """float -> sub-byte (truncate+wrap for ints; round-to-even, saturating, signed zero, NaN for float4) -> float."""
    x = np.concatenate([_EDGES, _f32(10) * 4]).reshape(4, 8)
    nodes = [h.make_node("Cast", ["x"], ["q"], to=to), h.make_node("Cast", ["q"], ["y"], to=T.FLOAT)]
    model = _model(nodes, [_vi("x", T.FLOAT, [4, 8])], [_vi("q", to, [4, 8]), _vi("y", T.FLOAT, [4, 8])], opset=25)
    if to != T.FLOAT4E2M1:
        x = np.where(np.isfinite(x), x, 0).astype(np.float32)  # the reference's NaN/inf -> int is platform-defined
    _check_reference(model, {"x": x})


def test_subbyte_graph_inputs_and_int4_weights():
    """An int4 graph input cast to float16, and DequantizeLinear of an int4 *initializer* (a 4-bit weight), per axis."""
    import ml_dtypes

    w = rng.integers(-8, 8, size=(3, 4)).astype(ml_dtypes.int4)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.5, 2.0, 0.25], np.float32), "s"),
             numpy_helper.from_array(np.array([1, -2, 0]).astype(ml_dtypes.int4), "zp")]
    nodes = [h.make_node("Cast", ["a"], ["a2"], to=T.FLOAT16),
             h.make_node("DequantizeLinear", ["w", "s", "zp"], ["wf"], axis=0)]
    model = _model(nodes, [_vi("a", T.INT4, [5])], [_vi("a2", T.FLOAT16, [5]), _vi("wf", T.FLOAT, [3, 4])], inits,
                   opset=25)
    _check_reference(model, {"a": np.array([-8, -1, 0, 5, 7]).astype(ml_dtypes.int4)})


@pytest.mark.parametrize("to", [T.INT4, T.UINT2, T.FLOAT4E2M1])
def test_quantize_linear_to_subbyte(to):
    """QuantizeLinear saturates to the sub-byte range (unlike Cast, which wraps); per-axis scales."""
    import ml_dtypes

    name = {T.INT4: "int4", T.UINT2: "uint2", T.FLOAT4E2M1: "float4_e2m1fn"}[to]
    zp = np.array([1, 0, 1] if to != T.FLOAT4E2M1 else [0, 0, 0]).astype(getattr(ml_dtypes, name))
    inits = [numpy_helper.from_array(np.array([0.5, 2.0, 0.25], np.float32), "s"), numpy_helper.from_array(zp, "zp")]
    node = h.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], axis=0)
    model = _model([node], [_vi("x", T.FLOAT, [3, 6])], [_vi("y", to, [3, 6])], inits, opset=25)
    _check_reference(model, {"x": _f32(3, 6) * 4})


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
def test_cast_to_float8_e8m0(mode):
    x = np.concatenate([np.abs(_f32(12)) * 8, np.array([0.125, 0.124, 3.0, 1.5, 2.0**127 * 1.5, np.inf, np.nan, 0],
                                                        np.float32)]).reshape(4, 5)
    node = h.make_node("Cast", ["x"], ["y"], to=T.FLOAT8E8M0, round_mode=mode)
    model = _model([node], [_vi("x", T.FLOAT, [4, 5])], [_vi("y", T.FLOAT8E8M0, [4, 5])], opset=24)
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = _edgecc(model, {"x": x})[0]
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


# ------------------------------------------------------------------ Resize, windows, IsInf, Mod, ReduceMax/Min


@pytest.mark.parametrize("attrs,scales,sizes,axes", [
    ({"mode": "cubic", "antialias": 1}, [1, 1, 0.6, 0.8], None, None),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, [1, 1, 1.7, 0.6], None, None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, [1, 1, 0.5, 0.6], None, None),
    ({"mode": "nearest", "keep_aspect_ratio_policy": "not_larger"}, None, [7, 5], [2, 3]),
    ({"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, None, [9, 3], [3, 2]),
])
def test_resize_modes(attrs, scales, sizes, axes):
    x = _f32(1, 2, 6, 5)
    if axes is not None:
        attrs = dict(attrs, axes=axes)
    inits = [numpy_helper.from_array(np.array(scales if scales else [], np.float32), "scales")]
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
    node = h.make_node("Resize", ["x", "", "scales"] + (["sizes"] if sizes else []), ["y"], **attrs)
    if sizes is not None:
        node.input[2] = ""
    model = _model([node], [_vi("x", T.FLOAT, [1, 2, 6, 5])], [h.make_empty_tensor_value_info("y")], inits,
                   opset=19)
    _check(model, {"x": x})


def test_resize_tf_crop_and_resize_extrapolates():
    """ROI beyond the input on both axes: outside positions take extrapolation_value."""
    inits = [numpy_helper.from_array(np.array([0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 5, 4], np.int64), "sizes")]
    node = h.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode="linear",
                       coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=7.5)
    model = _model([node], [_vi("x", T.FLOAT, [1, 1, 4, 4])], [h.make_empty_tensor_value_info("y")], inits, opset=19)
    from onnx.reference import ReferenceEvaluator

    x = _f32(1, 1, 4, 4)  # onnx's reference: onnxruntime 1.32 does not extrapolate past the right edge here
    np.testing.assert_allclose(_edgecc(model, {"x": x})[0], ReferenceEvaluator(model).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
def test_window_functions(op, periodic):
    """A window of a constant size is a constant; the graph has no input left (a parameterless `main`)."""
    inits = [numpy_helper.from_array(np.array(10, np.int32), "n")]
    node = h.make_node(op, ["n"], ["y"], periodic=periodic)
    model = _model([node], [], [_vi("y", T.FLOAT, [10])], inits, opset=17)
    _check(model, {})


def test_isinf_detect_flags():
    x = np.array([1.0, np.inf, -np.inf, np.nan, -0.0, 3.0], np.float32)
    nodes = [h.make_node("IsInf", ["x"], ["pos"], detect_negative=0),
             h.make_node("IsInf", ["x"], ["neg"], detect_positive=0)]
    model = _model(nodes, [_vi("x", T.FLOAT, [6])], [_vi("pos", T.BOOL, [6]), _vi("neg", T.BOOL, [6])], opset=13)
    _check(model, {"x": x})


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_mod_takes_the_divisor_sign(dtype):
    """Mod fmod=0 on floats is numpy's `mod` (onnxruntime runs it only from opset 28): inf, NaN, signed zeros."""
    x = np.array([0, -0.0, -3, 3, -1, 1, np.inf, 1, np.nan, 5.5, -5.5, 4], dtype)
    y = np.array([-2, 2, np.inf, np.inf, -np.inf, -np.inf, 2, 0, 2, -2, 2, 2], dtype)
    tt = T.FLOAT16 if dtype == np.float16 else T.FLOAT
    model = _model([h.make_node("Mod", ["x", "y"], ["m"], fmod=0)], [_vi("x", tt, [12]), _vi("y", tt, [12])],
                   [_vi("m", tt, [12])], opset=13)
    got = _edgecc(model, {"x": x, "y": y})[0]
    with np.errstate(all="ignore"):
        want = np.mod(x, y)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got[:2]), np.signbit(want[:2]))


def test_reduce_max_min_of_all_infinite_rows():
    """A row of only -inf (a fully masked attention row) reduces to -inf, not the lowest finite float."""
    x = _f32(3, 4)
    x[1] = -np.inf
    x[2] = np.inf
    nodes = [h.make_node("ReduceMax", ["x"], ["mx"], axes=[1], keepdims=0),
             h.make_node("ReduceMin", ["x"], ["mn"], axes=[1], keepdims=1)]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 4])], [_vi("mx", T.FLOAT, [3]), _vi("mn", T.FLOAT, [3, 1])],
                   opset=13)
    _check(model, {"x": x})


def test_graph_output_that_is_an_initializer():
    """A weight returned as is (what normalize makes of ConstantOfShape(initializer)) is kept as a constant:
    as a lifted parameter it lost its binding ("Var gv is not defined" in VM codegen)."""
    inits = [numpy_helper.from_array(_f32(2, 3), "w")]
    model = _model([], [], [_vi("w", T.FLOAT, [2, 3])], inits, opset=17)
    _check(model, {})


# ------------------------------------------------------------------ BitShift, SpaceToDepth CRD, Split, signal ops


def _check_against_reference(model, feeds, exact=False):
    """onnx's reference evaluator, for opset-28 semantics onnxruntime does not run yet."""
    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(model).run(None, feeds)
    got = _edgecc(model, feeds)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_bit_shift_out_of_range_amounts(direction):
    x = np.array([-8, 4, -1, 7, -128, 100], np.int32)
    s = np.array([-1, 32, 100, 3, 31, 0], np.int32)
    model = _model([h.make_node("BitShift", ["x", "s"], ["y"], direction=direction)],
                   [_vi("x", T.INT32, [6]), _vi("s", T.INT32, [6])], [_vi("y", T.INT32, [6])], opset=28)
    _check_against_reference(model, {"x": x, "s": s}, exact=True)


def test_space_to_depth_crd():
    model = _model([h.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, mode="CRD")],
                   [_vi("x", T.FLOAT, [1, 3, 4, 6])], [_vi("y", T.FLOAT, [1, 12, 2, 3])], opset=28)
    _check_against_reference(model, {"x": _f32(1, 3, 4, 6)}, exact=True)


def test_split_with_zero_sizes():
    inits = [numpy_helper.from_array(np.array([2, 0, 3], np.int64), "split")]
    model = _model([h.make_node("Split", ["x", "split"], ["a", "b", "c"], axis=1)], [_vi("x", T.FLOAT, [2, 5])],
                   [_vi("a", T.FLOAT, [2, 2]), _vi("b", T.FLOAT, [2, 0]), _vi("c", T.FLOAT, [2, 3])], inits, opset=18)
    _check(model, {"x": _f32(2, 5)})


def test_conv_transpose_output_shape():
    """output_shape larger than the natural size: the extra row/column is an end pad turned output_padding."""
    node = h.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[3, 2], output_shape=[10, 8])
    inits = [numpy_helper.from_array(_f32(1, 2, 3, 3), "w")]
    model = _model([node], [_vi("x", T.FLOAT, [1, 1, 3, 3])], [h.make_empty_tensor_value_info("y")], inits, opset=17)
    _check(model, {"x": _f32(1, 1, 3, 3)})


def test_col2im_with_pads_strides_dilations():
    node = h.make_node("Col2Im", ["x", "image", "block"], ["y"], pads=[1, 0, 1, 2], strides=[2, 1], dilations=[1, 2])
    inits = [numpy_helper.from_array(np.array([6, 5], np.int64), "image"),
             numpy_helper.from_array(np.array([2, 2], np.int64), "block")]
    # padded 8 x 7; blocks: ((8-2)//2+1) * ((7-3)//1+1) = 4 * 5
    model = _model([node], [_vi("x", T.FLOAT, [2, 12, 20])], [h.make_empty_tensor_value_info("y")], inits, opset=18)
    _check(model, {"x": _f32(2, 12, 20)})


@pytest.mark.parametrize("onesided,complex_in", [(1, False), (0, True)])
def test_stft_windowed(onesided, complex_in):
    comp = 2 if complex_in else 1
    inits = [numpy_helper.from_array(np.array(4, np.int64), "step"),
             numpy_helper.from_array(np.array(8, np.int64), "length")]
    node = h.make_node("STFT", ["sig", "step", "win", "length"], ["y"], onesided=onesided)
    model = _model([node], [_vi("sig", T.FLOAT, [2, 30, comp]), _vi("win", T.FLOAT, [8])],
                   [h.make_empty_tensor_value_info("y")], inits, opset=17)
    _check(model, {"sig": _f32(2, 30, comp), "win": np.hanning(8).astype(np.float32)})


def test_mel_weight_matrix():
    vals = [("bins", np.array(6, np.int64)), ("dft", np.array(32, np.int64)), ("rate", np.array(8000, np.int64)),
            ("lo", np.array(100.0, np.float32)), ("hi", np.array(3000.0, np.float32))]
    inits = [numpy_helper.from_array(v, n) for n, v in vals]
    node = h.make_node("MelWeightMatrix", [n for n, _ in vals], ["w"])
    model = _model([node], [], [h.make_empty_tensor_value_info("w")], inits, opset=17)
    _check(model, {})


@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 3], "pads": [1, 0, 1, 2], "strides": [2, 1]},
                                   {"kernel_shape": [2, 2], "strides": [2, 2], "storage_order": 1, "ceil_mode": 1},
                                   {"kernel_shape": [2, 3], "dilations": [2, 1]}])
def test_max_pool_indices(attrs):
    node = h.make_node("MaxPool", ["x"], ["y", "i"], **attrs)
    model = _model([node], [_vi("x", T.FLOAT, [2, 3, 7, 6])],
                   [h.make_empty_tensor_value_info("y"), h.make_empty_tensor_value_info("i")], opset=12)
    _check(model, {"x": _f32(2, 3, 7, 6)})


def test_batch_norm_training_mode():
    inits = [numpy_helper.from_array(v, n) for n, v in (("s", _f32(3)), ("b", _f32(3)), ("m", _f32(3)),
                                                          ("v", np.abs(_f32(3)) + 0.5))]
    node = h.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1,
                       momentum=0.8, epsilon=1e-3)
    model = _model([node], [_vi("x", T.FLOAT, [4, 3, 5])],
                   [_vi("y", T.FLOAT, [4, 3, 5]), _vi("rm", T.FLOAT, [3]), _vi("rv", T.FLOAT, [3])], inits, opset=15)
    _check_against_reference(model, {"x": _f32(4, 3, 5)})


def test_matmul_with_int4_qdq_weight():
    """The usual 4-bit QDQ pattern: DequantizeLinear(int4 weight, per-column scales) -> MatMul."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    w = rng.integers(-8, 8, size=(16, 8)).astype(ml_dtypes.int4)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.abs(_f32(8)) / 8 + 0.01, "s")]
    nodes = [h.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=1), h.make_node("MatMul", ["x", "wf"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [4, 16])], [_vi("y", T.FLOAT, [4, 8])], inits, opset=21)
    x = _f32(4, 16)
    np.testing.assert_allclose(_edgecc(model, {"x": x})[0], ReferenceEvaluator(model).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
