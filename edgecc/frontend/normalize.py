"""Graph clean-ups applied before import, so weights end up as weights.

* Old exporters (IR version < 4) list every initializer as a graph input too; the importer would then see
  each weight twice. Such inputs are dropped.
* Weight names with characters TVM's CUDA backend cannot emit ('/', ':', ...) are renamed.
* `ConstantOfShape` fed by an initializer (how the `onnx` wheel's "light" models store their weights, and
  how some exporters write zero biases) is materialised into an initializer: it is a weight, and belongs
  in params.bin rather than being recomputed by a kernel on every call.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    names = {t.name for t in model.graph.initializer}
    keep = [v for v in model.graph.input if v.name not in names]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)  # IR >= 4 allows initializers that are not inputs


def materialize_constant_of_shape(model: onnx.ModelProto) -> int:
    """Replace ConstantOfShape(initializer) nodes by initializers; returns how many were replaced."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    keep, replaced = [], 0
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                         np.zeros(1, dtype=np.float32))
            tensor = numpy_helper.from_array(np.full(tuple(shape.tolist()), value.reshape(-1)[0],
                                                     dtype=value.dtype), node.output[0])
            model.graph.initializer.append(tensor)
            consumers[node.input[0]] -= 1
            replaced += 1
        else:
            keep.append(node)
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        unused = {n for n, c in consumers.items() if c == 0}
        graph_outputs = {o.name for o in model.graph.output}
        remaining = [t for t in model.graph.initializer if t.name not in unused or t.name in graph_outputs]
        del model.graph.initializer[:]
        model.graph.initializer.extend(remaining)
    return replaced


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, renames)
            for sub in attr.graphs:
                _rename_inputs(sub, renames)


def sanitize_initializer_names(model: onnx.ModelProto) -> dict[str, str]:
    """Give weights names the CUDA backend can emit ("fire8/expand3x3_w_0" -> "fire8_expand3x3_w_0").

    Weight names become kernel parameter names in the generated CUDA C. TVM maps '.' to '_' itself
    (PyTorch's "fc1.weight" stays as it is, so recipes can match it) but not '/', which then does not
    compile. Returns {old: new} for the renamed ones.
    """
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    taken |= {o for n in model.graph.node for o in n.output}
    renames: dict[str, str] = {}
    for t in model.graph.initializer:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t.name):
            continue
        base = re.sub(r"[^A-Za-z0-9_.]", "_", t.name)
        base = base if re.match(r"[A-Za-z_]", base) else f"w_{base}"
        new, k = base, 1
        while new in taken:
            new, k = f"{base}_{k}", k + 1
        taken.add(new)
        renames[t.name] = new
        t.name = new
    if renames:
        _rename_inputs(model.graph, renames)
        for out in model.graph.output:
            if out.name in renames:  # a weight returned as an output keeps its public name
                model.graph.node.append(onnx.helper.make_node("Identity", [renames[out.name]], [out.name]))
    return renames


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    drop_initializer_inputs(model)
    materialize_constant_of_shape(model)
    sanitize_initializer_names(model)
    return model
