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
