"""Models already quantized by onnxruntime's tools, and quantized embeddings.

(a) MatMulNBits (MatMul4BitsQuantizer / hand-built), QDQ (`quantize_static`, 8- and 4-bit, and the
quantizer's QDQ format) and MatMulInteger (`quantize_dynamic`) map onto `edgecc.quantized_matmul`, and
GatherBlockQuantized onto `edgecc.quantized_gather`, with the model's own codes: each model is built for the
host and compared with onnxruntime running the *same quantized* model; the built module lists the annotated
ops and holds no float copy of a quantized weight.
(b) `--quantize` also quantizes Gather tables (`edgecc.quantized_gather`), compared with a numpy float64
dequantization; a tied lm_head shares the table's packed tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper
from tvm import relax

from edgecc.compress.quantize import quantize_weights
from edgecc.compress.rtn import quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.ir_passes import compression as C
from conftest import pack_low_bits_first

pytest.importorskip("onnxruntime")
MS = "com.microsoft"
K, H, N = 128, 256, 64
rng = np.random.default_rng(7)


def _ort(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # onnxruntime fuses a blocked 4-bit DequantizeLinear -> MatMul into MatMulNBits with int8 activations
    # (accuracy level 4) by default; level 0 keeps the float product the model specifies
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _mlp(gemm: bool = False) -> onnx.ModelProto:
    """y = relu(x @ w1) -> fc2 (a MatMul, or a Gemm with transB and a bias) -> [4, N]."""
    w1 = (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w1"], ["h"], name="/fc1/MatMul"), h.make_node("Relu", ["h"], ["r"])]
    inits = [numpy_helper.from_array(w1, "w1")]
    if gemm:
        w2 = (rng.standard_normal((N, H)) / np.sqrt(H)).astype(np.float32)
        nodes.append(h.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="/fc2/Gemm"))
        b2 = rng.standard_normal(N).astype(np.float32)
        inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    else:
        w2 = (rng.standard_normal((H, N)) / np.sqrt(H)).astype(np.float32)
        nodes.append(h.make_node("MatMul", ["r", "w2"], ["y"], name="/fc2/MatMul"))
        inits.append(numpy_helper.from_array(w2, "w2"))
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, [4, K])],
                         [h.make_tensor_value_info("y", T.FLOAT, [4, N])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _deploy(model):
    """(deploy module, [(param name, array)]) as `edgecc build` has them after lifting the weights."""
    from edgecc.build import lift_weight_transforms
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.signature import read_signature

    deploy, _, named = lift_weight_transforms(import_model(model, read_signature(model)))
    return deploy, named


def _build_and_compare(tmp_path, model, feeds, atol, name="q"):
    """Build for host, compare with onnxruntime on the same model; returns the build manifest."""
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    result = build_artifact(path, tmp_path / name, target="host")
    got = load_artifact(tmp_path / name).run(feeds)
    ref = _ort(model, feeds)
    for key, want in ref.items():
        np.testing.assert_allclose(got[key], want, rtol=0, atol=atol, err_msg=key)
    return result.manifest


def _no_float_weight(named, shapes):
    """No float32 [K, N] / [N, K] tensor of a quantized weight in what params.bin would hold."""
    bad = [n for n, a in named if a.dtype == np.float32 and (a.shape in shapes or a.shape[::-1] in shapes)]
    assert not bad, bad


# --------------------------------------------------------------------------------------------- MatMulNBits


@pytest.mark.parametrize("bits,symmetric,block", [(4, False, 32), (4, True, 64), (4, True, 128), (8, False, 32),
                                                  (8, True, 64)])
def test_matmul_nbits_quantizer_maps_onto_packed_kernels(bits, symmetric, block):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from tests.test_converters import _edgecc

    q = MatMulNBitsQuantizer(_mlp(), bits=bits, block_size=block, is_symmetric=symmetric)
    q.process()
    model = q.model.model
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    has_zp = any(len(n.input) > 3 and n.input[3] for n in model.graph.node if n.op_type == "MatMulNBits")
    assert has_zp == (not symmetric)
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    want = parse_scheme(f"w{bits}g{block}" + ("" if symmetric else "-asym"))
    assert [(op["name"], op["scheme"], op["source"]) for op in ops] == [
        (f"/fc1/MatMul_Q{bits}", want.name, "MatMulNBits"), (f"/fc2/MatMul_Q{bits}", want.name, "MatMulNBits")]
    _no_float_weight(named, {(K, H), (H, N)})
    packed = want.packed_nbytes(K, H) + want.packed_nbytes(H, N)
    assert sum(a.nbytes for _, a in named) == packed
    x = rng.standard_normal((4, K)).astype(np.float32)
    (got,) = _edgecc(model, {"x": x})
    ref = _ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())




@pytest.mark.parametrize("bits,with_zp", [(2, True), (2, False), (4, True), (8, False)])
def test_hand_built_matmul_nbits_with_bias(bits, with_zp):
    """Codes over the whole range (incl. 0 and 2^bits-1, which RTN never emits), odd zero points, a bias,
    fp32 scales; 3-D activations."""
    from tests.test_converters import _edgecc

    k, n, block = 128, 96, 64
    kb = k // block
    q = rng.integers(0, 1 << bits, size=(n, k))
    b = pack_low_bits_first(q, bits).reshape(n, kb, block * bits // 8)
    inits = [numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(rng.uniform(0.01, 0.05, (n, kb)).astype(np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias")]
    ins = ["a", "b", "scales", "zp" if with_zp else "", "", "bias"]
    if with_zp:
        z = rng.integers(0, 1 << bits, size=(n, kb))
        z = np.pad(z, ((0, 0), (0, (-kb) % (8 // bits))))
        inits.append(numpy_helper.from_array(pack_low_bits_first(z, bits).reshape(-1), "zp"))
    node = h.make_node("MatMulNBits", ins, ["y"], domain=MS, K=k, N=n, bits=bits, block_size=block, name="mm")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("a", T.FLOAT, [2, 3, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 3, n])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(MS, 1)])
    model.ir_version = 9
    deploy, named = _deploy(model)
    (op,) = C.annotated_ops(deploy)
    assert op["bits"] == bits and op["group_size"] == block and op["symmetric"] == (not with_zp)
    _no_float_weight(named, {(k, n)})
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    (got,) = _edgecc(model, {"a": a})
    ref = _ort(model, {"a": a})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_matmul_nbits_unmappable_block_keeps_dequantize():
    """block_size 16 has no edgecc storage (groups are multiples of 32): today's dequantize lowering."""
    from tests.test_converters import _edgecc

    k, n, block = 64, 32, 16
    q = rng.integers(0, 16, size=(n, k))
    inits = [numpy_helper.from_array(pack_low_bits_first(q, 4).reshape(n, k // block, 8), "b"),
             numpy_helper.from_array(rng.uniform(0.01, 0.05, n * k // block).astype(np.float32), "scales")]
    node = h.make_node("MatMulNBits", ["a", "b", "scales"], ["y"], domain=MS, K=k, N=n, bits=4, block_size=block)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("a", T.FLOAT, [2, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, n])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(MS, 1)])
    model.ir_version = 9
    deploy, named = _deploy(model)
    assert C.annotated_ops(deploy) == []
    assert any(a.dtype == np.float32 and a.shape == (k, n) for _, a in named)  # the lifted float weight
    a = rng.standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(_edgecc(model, {"a": a})[0], _ort(model, {"a": a})["y"], rtol=1e-5, atol=1e-5)


def test_matmul_nbits_artifact_lists_ops_and_stores_packed_weights(tmp_path, cli):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(_mlp(), bits=4, block_size=32, is_symmetric=False)
    q.process()
    feeds = {"x": rng.standard_normal((4, K)).astype(np.float32)}
    manifest = _build_and_compare(tmp_path, q.model.model, feeds, atol=1e-4)
    comp = manifest["compression"]
    assert comp["scheme"] == "model"
    assert [op["name"] for op in comp["annotated_ops"]] == ["/fc1/MatMul_Q4", "/fc2/MatMul_Q4"]
    s = parse_scheme("w4g32-asym")
    assert manifest["memory"]["weights_bytes"] == comp["packed_bytes"] == s.packed_nbytes(K, H) + s.packed_nbytes(H, N)
    assert (tmp_path / "q" / "params.bin").stat().st_size < 1.1 * comp["packed_bytes"] + 4096
    out = cli("inspect", str(tmp_path / "q")).output
    assert "2 annotated ops" in out and "/fc1/MatMul_Q4" in out and "w4g32-asym" in out


# ----------------------------------------------------------------------------- quantize_dynamic / QDQ


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_quantize_dynamic_matmul_integer(tmp_path, per_channel, weight_type):
    """DynamicQuantizeLinear + MatMulInteger: the w8 kernel on onnxruntime's own activation grid, so the
    int32 accumulators are onnxruntime's and the outputs agree to float rounding."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tests.test_converters import _edgecc

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_mlp(gemm=True), str(src))
    quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=getattr(QuantType, weight_type))
    model = onnx.load(str(dst))
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    assert [op["source"] for op in ops] == ["MatMulInteger"] * 2
    assert {op["scheme"] for op in ops} == {"w8" if weight_type == "QInt8" else "w8-asym"}
    _no_float_weight(named, {(K, H), (H, N)})
    x = rng.standard_normal((4, K)).astype(np.float32)
    (got,) = _edgecc(model, {"x": x})
    ref = _ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max() * 8)


def test_matmul_integer_exact_int32():
    """int8 weights with a per-column zero point, uint8 activations with one: exactly onnxruntime's int32."""
    from tests.test_converters import _edgecc

    b = rng.integers(-128, 128, size=(K, N)).astype(np.int8)
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.uint8(131), "azp"),
             numpy_helper.from_array(rng.integers(-5, 5, N).astype(np.int8), "bzp")]
    node = h.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"], name="mmi")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("a", T.UINT8, [5, K])],
                         [h.make_tensor_value_info("y", T.INT32, [5, N])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 9
    deploy, _ = _deploy(model)
    assert [op["scheme"] for op in C.annotated_ops(deploy)] == ["w8-asym"]
    a = rng.integers(0, 256, size=(5, K)).astype(np.uint8)
    np.testing.assert_array_equal(_edgecc(model, {"a": a})[0], _ort(model, {"a": a})["y"])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_quantize_static_qdq(tmp_path, per_channel, weight_type):
    """QDQ weights (DequantizeLinear -> MatMul, and -> Gemm with transB) map onto w8 / w8-asym; activation
    QDQ stays fake quantization. The output is itself QDQ'd, so it may differ by one output step."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from tests.test_converters import _edgecc

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_mlp(gemm=True), str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    weight_type=getattr(QuantType, weight_type), activation_type=QuantType.QUInt8)
    model = onnx.load(str(dst))
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    assert [(op["name"], op["source"]) for op in ops] == [("/fc1/MatMul", "QDQ MatMul"), ("/fc2/Gemm", "QDQ Gemm")]
    assert {op["scheme"] for op in ops} == {"w8" if weight_type == "QInt8" else "w8-asym"}
    _no_float_weight(named, {(K, H), (H, N)})
    y_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    x = rng.standard_normal((4, K)).astype(np.float32)
    (got,) = _edgecc(model, {"x": x})
    ref = _ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1.01 * y_scale)
    assert np.mean(got == ref) > 0.95


def test_qdq_blocked_weight_maps_to_grouped_scheme():
    """A hand-built blocked DequantizeLinear (int8, block 32 along K, zero points 0) -> w8g32."""
    from tests.test_converters import _edgecc

    q = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
    s = rng.uniform(0.001, 0.01, size=(K // 32, N)).astype(np.float32)
    nodes = [h.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0, block_size=32),
             h.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"),
             numpy_helper.from_array(np.zeros((K // 32, N), np.int8), "z")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, K])],
                         [h.make_tensor_value_info("y", T.FLOAT, [3, N])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    deploy, named = _deploy(model)
    assert [op["scheme"] for op in C.annotated_ops(deploy)] == ["w8g32"]
    _no_float_weight(named, {(K, N)})
    x = rng.standard_normal((3, K)).astype(np.float32)
    ref = x.astype(np.float64) @ (q.astype(np.float64) * np.repeat(s, 32, axis=0))
    np.testing.assert_allclose(_edgecc(model, {"x": x})[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------------------------- int4 / uint4 QDQ


def _static_quantized(tmp_path, weight_type: str, per_channel: bool) -> onnx.ModelProto:
    """`quantize_static` (QDQ, uint8 activations) of the Gemm MLP at opset 21 (int4 needs it)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    model = _mlp(gemm=True)
    model.opset_import[0].version, model.ir_version = 21, 10
    src, dst = tmp_path / f"f_{weight_type}.onnx", tmp_path / f"q_{weight_type}_{per_channel}.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    weight_type=getattr(QuantType, weight_type), activation_type=QuantType.QUInt8)
    return onnx.load(str(dst))


@pytest.mark.parametrize("symmetric,channel_wise,scheme", [(True, False, "w4g32"), (False, False, "w4g32-asym"),
                                                           (True, True, "w4")])
def test_quantizer_qdq_int4_weights_map_onto_w4(symmetric, channel_wise, scheme):
    """MatMulNBitsQuantizer's QDQ format: DequantizeLinear of int4 (symmetric) / uint4 + uint4 zero points
    blocked along K -> MatMul; channel-wise: an int4 [N, K] weight, one block of K, -> Transpose -> MatMul."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from tests.test_converters import _edgecc

    q = MatMulNBitsQuantizer(_mlp(), bits=4, block_size=32, is_symmetric=symmetric, quant_format=QuantFormat.QDQ,
                             channel_wised_quantize=channel_wise)
    q.process()
    model = q.model.model
    types = {i.data_type for i in model.graph.initializer if i.name.endswith("_DQ_Q4")}
    assert types == {T.INT4 if symmetric else T.UINT4}
    assert ("Transpose" in {n.op_type for n in model.graph.node}) == channel_wise
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    assert [(op["name"], op["scheme"], op["source"]) for op in ops] == [
        ("/fc1/MatMul_matmul_Q4", scheme, "QDQ MatMul"), ("/fc2/MatMul_matmul_Q4", scheme, "QDQ MatMul")]
    _no_float_weight(named, {(K, H), (H, N)})
    want = parse_scheme(scheme)
    assert sum(a.nbytes for _, a in named) == want.packed_nbytes(K, H) + want.packed_nbytes(H, N)
    x = rng.standard_normal((4, K)).astype(np.float32)
    (got,) = _edgecc(model, {"x": x})
    ref = _ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["QInt4", "QUInt4"])
def test_quantize_static_int4_qdq(tmp_path, per_channel, weight_type):
    """quantize_static with 4-bit weights: int4 (zero point 0) -> w4, uint4 -> w4-asym, per tensor or per
    channel (one group over all of K), for the MatMul and the transB Gemm."""
    from tests.test_converters import _edgecc

    model = _static_quantized(tmp_path, weight_type, per_channel)
    assert {i.data_type for i in model.graph.initializer if i.name in ("w1_quantized", "w2_quantized")} == \
        {T.INT4 if weight_type == "QInt4" else T.UINT4}
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    scheme = "w4" if weight_type == "QInt4" else "w4-asym"
    assert [(op["name"], op["scheme"], op["source"]) for op in ops] == [
        ("/fc1/MatMul", scheme, "QDQ MatMul"), ("/fc2/Gemm", scheme, "QDQ Gemm")]
    _no_float_weight(named, {(K, H), (H, N)})
    y_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
    x = rng.standard_normal((4, K)).astype(np.float32)
    (got,) = _edgecc(model, {"x": x})
    ref = _ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1.01 * y_scale)  # the output is QDQ'd: one step
    assert np.mean(got == ref) > 0.95


def _dq_matmul(q, qtype, s, z, k: int, n: int, **attrs) -> onnx.ModelProto:
    """x [3, k] @ DequantizeLinear(q (of ONNX type qtype), s[, z])."""
    inits = [h.make_tensor("q", qtype, q.shape, q.flatten().tolist()), numpy_helper.from_array(s, "s")]
    ins = ["q", "s"]
    if z is not None:
        inits.append(h.make_tensor("z", qtype, z.shape, z.flatten().tolist()))
        ins.append("z")
    nodes = [h.make_node("DequantizeLinear", ins, ["w"], **attrs), h.make_node("MatMul", ["x", "w"], ["y"],
                                                                              name="/proj/MatMul")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, [3, n])], inits)
    two_bit = qtype in (T.INT2, T.UINT2)  # DequantizeLinear reads int2/uint2 from opset 25
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 25 if two_bit else 21)])
    model.ir_version = 11 if two_bit else 10
    return model


_CODE_RANGE = {T.INT4: (-8, 8), T.UINT4: (0, 16), T.INT2: (-2, 2), T.UINT2: (0, 4)}


@pytest.mark.parametrize("qtype,zp,k,block,scheme", [
    (T.INT4, "random", 128, 32, "w4g32-asym"),  # int4 codes and zero points over the whole range
    (T.UINT4, None, 128, 64, "w4g64-asym"),  # uint4 without zero points: zero 0
    (T.INT4, "zeros", 128, 128, "w4"),  # one block spans K: per channel
    (T.INT4, None, 36, 0, "w8"),  # per channel, 36 4-bit codes fill no whole uint32 word: kept at 8 bits
    (T.UINT4, "random", 64, 16, None),  # block 16: no edgecc storage, the float dequantization stays
    (T.INT2, None, 128, 32, "w2g32"), (T.UINT2, "random", 128, 32, "w2g32-asym"),  # 2-bit codes: w2
])
def test_hand_built_subbyte_qdq(qtype, zp, k, block, scheme):
    from tests.test_converters import _edgecc

    n = 64
    lo, hi = _CODE_RANGE[qtype]
    q = rng.integers(lo, hi, size=(k, n))
    sshape = (k // block, n) if block else (n,)
    s = rng.uniform(0.01, 0.05, size=sshape).astype(np.float32)
    z = {None: None, "zeros": np.zeros(sshape, np.int64), "random": rng.integers(lo, hi, size=sshape)}[zp]
    attrs = dict(axis=0, block_size=block) if block else dict(axis=1)
    model = _dq_matmul(q, qtype, s, z, k, n, **attrs)
    deploy, named = _deploy(model)
    assert [op["scheme"] for op in C.annotated_ops(deploy)] == ([scheme] if scheme else [])
    if scheme:
        _no_float_weight(named, {(k, n)})
        want = parse_scheme(scheme)
        implicit = int(np.prod(want.storage_shapes(k, n)["zeros"][0])) if z is None and not want.symmetric else 0
        assert sum(a.nbytes for _, a in named) == want.packed_nbytes(k, n) - implicit  # zeros 0: a constant
    x = rng.standard_normal((3, k)).astype(np.float32)
    rep = (lambda p: np.repeat(p, block, axis=0)) if block else (lambda p: p[None, :])
    w = (q - (rep(z) if z is not None else 0)) * rep(s).astype(np.float64)
    ref = x.astype(np.float64) @ w
    got = _edgecc(model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(got, _ort(model, {"x": x})["y"], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_int4_qdq_artifact_stores_half_the_int8_bytes(tmp_path, cli):
    """The same MLP through quantize_static with int4 and with int8 weights: the int4 artifact lists w4 ops
    and its params.bin holds about half the bytes (4-bit codes; scales and bias the same)."""
    manifests, sizes = {}, {}
    feeds = {"x": rng.standard_normal((4, K)).astype(np.float32)}
    for wt in ("QInt4", "QInt8"):
        model = _static_quantized(tmp_path, wt, per_channel=True)
        y_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "y_scale")))
        manifests[wt] = _build_and_compare(tmp_path, model, feeds, atol=1.01 * y_scale, name=wt)
        sizes[wt] = (tmp_path / wt / "params.bin").stat().st_size
    comp = manifests["QInt4"]["compression"]
    assert [(op["name"], op["scheme"]) for op in comp["annotated_ops"]] == [("/fc1/MatMul", "w4"), ("/fc2/Gemm", "w4")]
    w4, w8 = parse_scheme("w4"), parse_scheme("w8")
    assert comp["packed_bytes"] == w4.packed_nbytes(K, H) + w4.packed_nbytes(H, N)
    assert manifests["QInt8"]["compression"]["packed_bytes"] == w8.packed_nbytes(K, H) + w8.packed_nbytes(H, N)
    assert 0.45 * sizes["QInt8"] < sizes["QInt4"] < 0.56 * sizes["QInt8"], sizes
    out = cli("inspect", str(tmp_path / "QInt4")).output
    assert "2 annotated ops" in out and "/fc2/Gemm" in out and "w4" in out and "w8" not in out


# --------------------------------------------------------------------------------------- model zoo


def test_tiny_gpt_matmul_nbits_builds_and_matches(tmp_path, cli):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgecc.models.registry import MODELS

    entry = MODELS["tiny-gpt-prefill"]
    path = entry.export(tmp_path / "gpt.onnx")
    q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=32, is_symmetric=True)
    q.process()
    model = q.model.model
    n_mm = [n.op_type for n in model.graph.node].count("MatMulNBits")
    assert n_mm >= 8
    manifest = _build_and_compare(tmp_path, model, entry.feeds(seed=1), atol=2e-5, name="gpt")
    ops = manifest["compression"]["annotated_ops"]
    assert len(ops) == n_mm and {op["scheme"] for op in ops} == {"w4g32"}
    out = cli("inspect", str(tmp_path / "gpt")).output
    assert f"{n_mm} annotated ops" in out and "/blocks.0/attn/c_attn/MatMul_Q4" in out


@pytest.mark.slow
def test_minilm_quantize_dynamic_builds_and_matches(tmp_path):
    """onnxruntime's quantize_dynamic (per-channel int8) MiniLM: every MatMul onto the w8 kernel.

    A quantized network flips activation codes on float-rounding differences: onnxruntime itself differs
    from itself by ~0.13 on a few tokens between graph optimization levels. So the check is that edgecc is
    as close to onnxruntime as onnxruntime's two runs are to each other."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS
    from edgecc.runtime_bridge.host import load_artifact

    entry = MODELS["minilm"]
    src = entry.export(tmp_path / "minilm.onnx")
    dst = tmp_path / "minilm_q.onnx"
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    model = onnx.load(str(dst))
    n_mmi = [n.op_type for n in model.graph.node].count("MatMulInteger")
    manifest = build_artifact(dst, tmp_path / "out", target="host").manifest
    assert len(manifest["compression"]["annotated_ops"]) == n_mmi == 36
    feeds = entry.feeds(seed=0)
    got = load_artifact(tmp_path / "out").run(feeds)
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
        runs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))))
    for key in runs[1]:
        ort_spread = np.abs(runs[0][key] - runs[1][key])
        err = np.abs(got[key] - runs[1][key])
        assert err.max() <= 2 * ort_spread.max() + 1e-4, key
        assert err.mean() <= 2 * ort_spread.mean() + 1e-5, key


def test_dynamic_quantize_linear_matches_onnxruntime():
    """onnxruntime's arithmetic (round(x / scale) + zp, half to even), including an all-zero input."""
    from tests.test_converters import _edgecc

    outs = [h.make_tensor_value_info(n, t, s) for n, t, s in (("y", T.UINT8, [64, 33]), ("s", T.FLOAT, []),
                                                               ("zp", T.UINT8, []))]
    graph = h.make_graph([h.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "zp"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, [64, 33])], outs)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 9
    for x in (rng.standard_normal((64, 33)).astype(np.float32) * 3 + 0.7, np.zeros((64, 33), np.float32),
              np.round(rng.standard_normal((64, 33)) * 4).astype(np.float32) / 2):  # many exact ties
        ref = _ort(model, {"x": x})
        got = _edgecc(model, {"x": x})
        for value, key in zip(got, ("y", "s", "zp")):
            np.testing.assert_array_equal(value, ref[key], err_msg=key)


# --------------------------------------------------------------------------------------------- gather


def _embed_module(tied: bool):
    """main(ids, table[V, D], w[D, V]) = take(table, ids) @ w  (w = table^T when tied)."""
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType((2, 5), "int64"))
    table = relax.Var("table", relax.TensorType((N, K), "float32"))
    w = relax.Var("lm_head", relax.TensorType((K, N), "float32"))
    with bb.function("main", [ids, table, w], attrs={"num_input": 1}):
        with bb.dataflow():
            e = bb.emit(relax.op.take(table, ids, axis=0))
            y = bb.emit(relax.op.matmul(e, w))
            gv = bb.emit_output(relax.Tuple([e, y]))
        bb.emit_func_output(gv)
    t = rng.standard_normal((N, K)).astype(np.float32)
    lm = t.T.copy() if tied else rng.standard_normal((K, N)).astype(np.float32)
    return bb.get(), [("table", t), ("lm_head", lm)]


def _run(mod, named, ids):
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.runtime_bridge.host import _flatten
    from edgecc.targets.registry import get_target

    spec = get_target("host")
    ex = relax.build(relax_pipeline(spec)(mod), spec.tvm(), relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(ids)] + [tvm.runtime.tensor(a) for _, a in named]
    return [t.numpy() for t in _flatten(vm["main"](*args))]


@pytest.mark.parametrize("scheme", ["w8", "w4g32", "w4g32-asym", "w3g64"])
def test_quantized_gather_matches_float64_dequantization(scheme):
    mod, named = _embed_module(tied=False)
    qmod, qnamed, report = quantize_weights(mod, named, scheme)
    ops = C.annotated_ops(qmod)
    assert [(op["op"], op["name"], op["in_features"], op["out_features"]) for op in ops] == [
        (C.QUANT_GATHER, "table", K, N), (C.QUANT_MATMUL, "lm_head", K, N)]
    assert [op["op"] for op in report.ops] == ["gather", "matmul"]
    _no_float_weight(qnamed, {(N, K)})
    ids = np.array([[0, 3, N - 1, 7, 3], [1, -1, 5, 60, 2]], np.int64)
    emb, _ = _run(qmod, qnamed, ids)
    ref = quantize_rtn(named[0][1].T, parse_scheme(scheme)).dequantize().T  # [V, D], float64
    np.testing.assert_allclose(emb, ref[ids], rtol=1e-6, atol=1e-6)


def test_tied_embedding_shares_packed_tensors():
    mod, named = _embed_module(tied=True)
    qmod, qnamed, report = quantize_weights(mod, named, "w4g32")
    assert [n for n, _ in qnamed] == ["table.qweight", "table.scales"]  # stored once
    gather, matmul = C.annotated_ops(qmod)
    assert gather["op"] == C.QUANT_GATHER and matmul["op"] == C.QUANT_MATMUL
    assert report.ops[1]["shares"] == "table" and report.to_manifest()["packed_bytes"] == report.ops[0]["packed_bytes"]
    ids = np.array([[0, 3, N - 1, 7, 3], [1, 2, 5, 60, 2]], np.int64)
    emb, y = _run(qmod, qnamed, ids)
    wq = quantize_rtn(named[0][1].T, parse_scheme("w4g32")).dequantize()  # [K, N]
    np.testing.assert_allclose(emb, wq.T[ids], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, emb.astype(np.float64) @ wq, rtol=1e-4, atol=1e-4)
    # untied, or a recipe giving the two different schemes: two packed tensors
    _, qnamed2, _ = quantize_weights(mod, named, _recipe({"*lm_head*": "w8"}, "w4g32"))
    assert [n for n, _ in qnamed2] == ["table.qweight", "table.scales", "lm_head.qweight", "lm_head.scales"]


def _recipe(layers, default):
    from edgecc.compress.recipe import Recipe

    return Recipe(default=parse_scheme(default), layers=[(k, parse_scheme(v)) for k, v in layers.items()])


def test_recipe_can_keep_embeddings_float():
    from edgecc.compress.recipe import Recipe

    mod, named = _embed_module(tied=False)
    recipe = Recipe(default=parse_scheme("w8"), layers=[("table", None)])
    qmod, qnamed, report = quantize_weights(mod, named, recipe)
    assert [op["op"] for op in C.annotated_ops(qmod)] == [C.QUANT_MATMUL]
    assert ("table", named[0][1].shape) in [(n, a.shape) for n, a in qnamed]
    assert report.skipped[0]["name"] == "table"


# ------------------------------------------------------------------------------- GatherBlockQuantized


def _gbq_model(data: onnx.TensorProto, scales: np.ndarray, zp: onnx.TensorProto | None, ids_shape, out_shape,
               **attrs) -> onnx.ModelProto:
    inits = [data, numpy_helper.from_array(scales, "s")] + ([zp] if zp is not None else [])
    node = h.make_node("GatherBlockQuantized", ["d", "ids", "s"] + (["z"] if zp is not None else []), ["y"],
                       domain=MS, name="/embed/GatherBlockQuantized", **attrs)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("ids", T.INT64, ids_shape)],
                         [h.make_tensor_value_info("y", T.FLOAT, out_shape)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def _packed_table(v: int, d: int, bits: int, block: int, with_zp: bool):
    """A uint8 GatherBlockQuantized table (MatMulNBits' packing) over the whole code range."""
    groups = -(-d // block)
    q = rng.integers(0, 1 << bits, size=(v, d))
    data = numpy_helper.from_array(pack_low_bits_first(q, bits).reshape(v, d * bits // 8), "d")
    zt = None
    if with_zp:
        z = rng.integers(0, 1 << bits, size=(v, groups))
        z = np.pad(z, ((0, 0), (0, (-groups) % (8 // bits))))
        zt = numpy_helper.from_array(pack_low_bits_first(z, bits).reshape(v, -1), "z")
    return data, rng.uniform(0.01, 0.05, (v, groups)).astype(np.float32), zt


GBQ_IDS = np.array([[0, 3, N - 1, 7], [1, -1, 5, 2]], np.int64)


@pytest.mark.parametrize("bits,with_zp,block,scheme", [
    (4, False, 32, "w4g32"), (4, True, 64, "w4g64-asym"), (2, True, 32, "w2g32-asym"), (8, False, 32, "w8g32"),
    (8, True, 128, "w8-asym"),  # one block spans the row: per channel
    (4, True, 16, None),  # block 16: dequantized in full
])
def test_gather_block_quantized_uint8(bits, with_zp, block, scheme):
    """uint8 tables (bits-bit codes packed along the row, default zero point 2^(bits-1)) -> quantized_gather,
    the same values as onnxruntime (both compute (q - zp) * scale in fp32)."""
    from tests.test_converters import _edgecc

    data, s, zt = _packed_table(N, K, bits, block, with_zp)
    model = _gbq_model(data, s, zt, [2, 4], [2, 4, K], block_size=block, bits=bits, gather_axis=0, quantize_axis=1)
    deploy, named = _deploy(model)
    ops = C.annotated_ops(deploy)
    assert [(op["op"], op["scheme"], op["name"], op["source"]) for op in ops] == (
        [(C.QUANT_GATHER, scheme, "/embed/GatherBlockQuantized", "GatherBlockQuantized")] if scheme else [])
    if scheme:
        _no_float_weight(named, {(N, K)})
        assert sum(a.nbytes for _, a in named) == parse_scheme(scheme).packed_nbytes(K, N)
    got = _edgecc(model, {"ids": GBQ_IDS})[0]
    np.testing.assert_allclose(got, _ort(model, {"ids": GBQ_IDS})["y"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizer_gather_block_quantized_int4(symmetric):
    """MatMulNBitsQuantizer over a Gather + MatMul: GatherBlockQuantized with an int4 table (symmetric) or a
    uint4 table with uint4 zero points -> quantized_gather w4g32[-asym]; the MatMul -> MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from tests.test_converters import _edgecc

    table = rng.standard_normal((N, K)).astype(np.float32)
    w = (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32)
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="/embed/Gather"),
             h.make_node("MatMul", ["e", "w"], ["y"], name="/fc/MatMul")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT64, [2, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 4, H])],
                         [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=symmetric,
                             op_types_to_quantize=("MatMul", "Gather"))
    q.process()
    model = q.model.model
    (gbq,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert next(i for i in model.graph.initializer if i.name == gbq.input[0]).data_type == \
        (T.INT4 if symmetric else T.UINT4)
    deploy, named = _deploy(model)
    scheme = "w4g32" if symmetric else "w4g32-asym"
    assert [(op["op"], op["scheme"], op["name"]) for op in C.annotated_ops(deploy)] == [
        (C.QUANT_GATHER, scheme, "/embed/Gather_Q4"), (C.QUANT_MATMUL, scheme, "/fc/MatMul_Q4")]
    _no_float_weight(named, {(N, K), (K, H)})
    want = parse_scheme(scheme)
    assert sum(a.nbytes for _, a in named) == want.packed_nbytes(K, N) + want.packed_nbytes(K, H)
    ref = _ort(model, {"ids": GBQ_IDS})["y"]
    np.testing.assert_allclose(_edgecc(model, {"ids": GBQ_IDS})[0], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype,gather_axis,quantize_axis", [(T.INT4, 0, 0), (T.UINT4, 1, 1), (T.INT4, 1, 0)])
def test_gather_block_quantized_other_layouts_dequantize(qtype, gather_axis, quantize_axis):
    """Layouts edgecc's gather kernel does not read (blocks along the gathered axis, gathers along the
    row): dequantized in full, then `take`; same values as onnxruntime, zero points included."""
    from tests.test_converters import _edgecc

    lo, hi = (-8, 8) if qtype == T.INT4 else (0, 16)
    shape = [N, K]
    sshape = list(shape)
    sshape[quantize_axis] //= 32
    data = h.make_tensor("d", qtype, shape, rng.integers(lo, hi, size=shape).flatten().tolist())
    zt = h.make_tensor("z", qtype, sshape, rng.integers(lo, hi, size=sshape).flatten().tolist())
    s = rng.uniform(0.01, 0.05, sshape).astype(np.float32)
    out = [2, 4, K] if gather_axis == 0 else [N, 2, 4]
    model = _gbq_model(data, s, zt, [2, 4], out, block_size=32, gather_axis=gather_axis, quantize_axis=quantize_axis)
    deploy, _ = _deploy(model)
    assert C.annotated_ops(deploy) == []
    ids = np.array([[0, 3, 50, 7], [1, -1, 5, 2]], np.int64)
    np.testing.assert_allclose(_edgecc(model, {"ids": ids})[0], _ort(model, {"ids": ids})["y"], rtol=1e-6, atol=1e-7)


def test_gather_block_quantized_artifact_half_of_8bit(tmp_path, cli):
    """A 4-bit and an 8-bit uint8 GatherBlockQuantized table of the same shape, built: the manifest and
    inspect list the gather with its scheme, and the 4-bit params.bin holds about half the bytes."""
    sizes, feeds = {}, {"ids": GBQ_IDS}
    v, d = 512, 256
    for bits in (4, 8):
        data, s, zt = _packed_table(v, d, bits, 32, with_zp=False)
        model = _gbq_model(data, s, zt, [2, 4], [2, 4, d], block_size=32, bits=bits)
        manifest = _build_and_compare(tmp_path, model, feeds, atol=1e-7, name=f"b{bits}")
        ops = manifest["compression"]["annotated_ops"]
        assert [(op["name"], op["scheme"]) for op in ops] == [("/embed/GatherBlockQuantized", f"w{bits}g32")]
        assert manifest["compression"]["packed_bytes"] == parse_scheme(f"w{bits}g32").packed_nbytes(d, v)
        sizes[bits] = (tmp_path / f"b{bits}" / "params.bin").stat().st_size
        out = cli("inspect", str(tmp_path / f"b{bits}")).output
        assert "1 annotated op" in out and "/embed/GatherBlockQuantized" in out and f"w{bits}g32" in out
    assert 0.5 * sizes[8] < sizes[4] < 0.6 * sizes[8], sizes  # codes halve; the fp32 scales stay


# ---------------------------------------------------------------------------------- generated names


def test_generated_initializer_names_show_node_names(tmp_path, cli):
    """torch names linear weights onnx::MatMul_N: the manifest, inspect and recipe globs use the node name."""
    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS

    path = MODELS["tiny-gpt-prefill"].export(tmp_path / "gpt.onnx")
    recipe = tmp_path / "r.json"
    recipe.write_text('{"default": "w8", "layers": {"*/fc/MatMul": "w4g32"}}')
    manifest = build_artifact(path, tmp_path / "out", target="host", quantize=str(recipe)).manifest
    ops = {op["name"]: op for op in manifest["compression"]["annotated_ops"]}
    assert "/blocks.0/attn/c_attn/MatMul" in ops and not any("MatMul_" in n for n in ops)
    assert ops["/blocks.0/fc/MatMul"]["scheme"] == "w4g32" and ops["/blocks.0/proj/MatMul"]["scheme"] == "w8"
    assert ops["gpt.wte.weight"]["op"] == "gather"
    out = cli("inspect", str(tmp_path / "out")).output
    assert "/blocks.1/fc/MatMul" in out
