"""Frontend clean-ups (edgecc/frontend/normalize.py): graph before -> after, and the same numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgecc.frontend.normalize import normalize


def _run(model: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _old_style_model() -> onnx.ModelProto:
    """IR-3 style: weights listed as inputs, one weight made by ConstantOfShape, names with '/'."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [
        helper.make_node("ConstantOfShape", ["b/shape"], ["b/value"],
                         value=numpy_helper.from_array(np.array([0.5], dtype=np.float32))),
        helper.make_node("MatMul", ["x", "layer/w"], ["mm"]),
        helper.make_node("Add", ["mm", "b/value"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("layer/w", TensorProto.FLOAT, [4, 3]),
         helper.make_tensor_value_info("b/shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "layer/w"), numpy_helper.from_array(np.array([3], dtype=np.int64), "b/shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


def test_normalize_before_after():
    before = _old_style_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    want = _run(before, feeds)[0]

    after = normalize(onnx.ModelProto.FromString(before.SerializeToString()))
    assert [v.name for v in after.graph.input] == ["x"]  # weights no longer listed as inputs
    assert after.ir_version >= 4
    assert [n.op_type for n in after.graph.node] == ["MatMul", "Add"]  # ConstantOfShape became a weight
    names = sorted(t.name for t in after.graph.initializer)
    assert names == ["b_value", "layer_w"]  # C identifiers; the unused shape tensor is gone
    assert list(after.graph.node[0].input) == ["x", "layer_w"]
    onnx.checker.check_model(after)
    np.testing.assert_array_equal(_run(after, feeds)[0], want)


def test_normalize_leaves_clean_models_alone():
    before = _old_style_model()
    clean = normalize(onnx.ModelProto.FromString(before.SerializeToString()))
    again = normalize(onnx.ModelProto.FromString(clean.SerializeToString()))
    assert again.SerializeToString() == clean.SerializeToString()


def test_subbyte_signature_and_containers():
    """int4/float4 graph I/O crosses the boundary one element per byte; the manifest names the ONNX type."""
    import ml_dtypes

    from edgecc.frontend.signature import Signature, read_signature
    from edgecc.frontend.subbyte import from_container, to_container

    graph = helper.make_graph([helper.make_node("Cast", ["q"], ["f"], to=TensorProto.FLOAT4E2M1)], "g",
                              [helper.make_tensor_value_info("q", TensorProto.INT4, ["n"])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT4E2M1, ["n"])])
    sig = read_signature(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    (q,), (f,) = sig.inputs, sig.outputs
    assert (q.dtype, q.element, f.dtype, f.element) == ("int8", "int4", "uint8", "float4_e2m1fn")
    assert sig.to_json()["inputs"][0] == {"name": "q", "dtype": "int8", "shape": ["n"], "element": "int4"}
    assert Signature.from_json(sig.to_json()) == sig
    assert q.concrete({"n": 3}).element == "int4"

    ints = np.array([-8, -1, 0, 7]).astype(ml_dtypes.int4)
    np.testing.assert_array_equal(to_container(ints), np.array([-8, -1, 0, 7], np.int8))
    f4 = np.array([0.5, -0.0, 6, -6], np.float32).astype(ml_dtypes.float4_e2m1fn)
    codes = to_container(f4)
    np.testing.assert_array_equal(codes, np.array([1, 8, 7, 15], np.uint8))
    np.testing.assert_array_equal(from_container(codes, "float4_e2m1fn").astype(np.float32), [0.5, -0.0, 6, -6])
    assert to_container(np.ones(2, np.float32)).dtype == np.float32  # other arrays pass through
