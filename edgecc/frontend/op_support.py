"""Which ONNX ops edgecc can import, decided before trying.

`edgecc inspect` and `edgecc build` both use this so that an unsupported op is reported with its node name
and op type up front, rather than as an importer traceback halfway through a model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

# Handled by the importer itself rather than through a converter.
_DIRECT = {"If", "Constant"}


def supported_ops() -> set[str]:
    """Op types with a converter in TVM's importer (edgecc's own converters extend this set)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from edgecc.frontend.converters import op_types

    return set(_get_convert_map()) | _DIRECT | op_types()


def _has_converter_for(op_type: str, opset: int) -> bool:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from edgecc.frontend.converters import op_types

    convert_map = _get_convert_map()
    if op_type in _DIRECT or op_type in op_types():
        return True
    if op_type not in convert_map:
        return False
    try:
        convert_map[op_type].get_converter(opset)
    except Exception:  # noqa: BLE001 - TVM raises NotImplementedError / TVMError for missing versions
        return False
    return True


@dataclass(frozen=True)
class UnsupportedNode:
    op_type: str
    node_name: str
    domain: str
    reason: str

    def describe(self) -> str:
        dom = f"{self.domain}::" if self.domain not in ("", "ai.onnx") else ""
        return f"{dom}{self.op_type} (node '{self.node_name}'): {self.reason}"


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in _all_nodes(model.graph))


def find_unsupported(model: onnx.ModelProto, opset: int) -> list[UnsupportedNode]:
    known = supported_ops()
    out: list[UnsupportedNode] = []
    for index, node in enumerate(_all_nodes(model.graph)):
        name = node.name or f"#{index}"
        if node.op_type not in known:
            out.append(UnsupportedNode(node.op_type, name, node.domain, "no converter"))
        elif not _has_converter_for(node.op_type, opset):
            out.append(UnsupportedNode(node.op_type, name, node.domain, f"no converter for opset {opset}"))
    return out
