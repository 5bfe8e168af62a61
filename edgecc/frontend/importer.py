"""ONNX -> Relax, with the weights kept apart from the graph.

TVM's importer does the op-by-op work, after edgecc's own converters (`edgecc/frontend/converters`, for
ops TVM lacks or gets wrong; looked up by op type and domain). edgecc adds what a user needs around it:
unsupported ops reported before import, an import failure that names the node it happened at, and the
weights detached as named parameters (so the artifact can store them in `params.bin` instead of baking
them into the library).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from edgecc.errors import EdgeccError
from edgecc.frontend.loader import default_opset
from edgecc.frontend.op_support import find_unsupported
from edgecc.frontend.signature import Signature


@dataclass
class ImportedModel:
    mod: "object"  # tvm.IRModule whose "main" takes the inputs, then the weights (attr num_input)
    params: list[tuple[str, np.ndarray]]  # weights in the order "main" takes them


def _importer_class():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from edgecc.frontend import converters

    class _NodeTrackingImporter(ONNXGraphImporter):
        """Remembers which node is being converted so an error can name it."""

        current_node: tuple[str, str] | None = None

        def _convert_operator(self, op_name, inputs, attrs, opset):  # noqa: D401 - TVM override
            self.current_node = (op_name, attrs.get("tvm_custom", {}).get("name", "?"))
            domain = attrs.pop(converters.DOMAIN_ATTR, b"")
            convert = converters.lookup(op_name, domain.decode() if isinstance(domain, bytes) else domain)
            if convert is not None:  # edgecc's own converter (edgecc/frontend/converters) first
                sym = convert(self.bb, inputs, attrs, [self._nodes, self._params], opset)
                if sym is not NotImplemented:
                    return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
            return super()._convert_operator(op_name, inputs, attrs, opset)

        def _check_for_unsupported_ops(self, graph):
            pass  # done before import, with edgecc's converters counted (op_support.find_unsupported)

    return _NodeTrackingImporter


def _mark_domains(graph: onnx.GraphProto) -> list:
    """Tag nodes outside the default domain with their domain (TVM's converters never see it)."""
    from edgecc.frontend.converters import DOMAIN_ATTR
    from edgecc.frontend.op_support import _all_nodes

    marked = [n for n in _all_nodes(graph) if n.domain not in ("", "ai.onnx")]
    for node in marked:
        node.attribute.append(onnx.helper.make_attribute(DOMAIN_ATTR, node.domain))
    return marked


def _unmark_domains(marked: list) -> None:
    from edgecc.frontend.converters import DOMAIN_ATTR

    for node in marked:
        keep = [a for a in node.attribute if a.name != DOMAIN_ATTR]
        del node.attribute[:]
        node.attribute.extend(keep)


def import_model(model: onnx.ModelProto, signature: Signature) -> ImportedModel:
    """Import with the given (fully static) input signature."""
    from tvm.relax.frontend import detach_params

    opset = default_opset(model)
    unsupported = find_unsupported(model, opset)
    if unsupported:
        listed = "; ".join(u.describe() for u in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise EdgeccError(
            f"the model uses ops edgecc cannot import: {listed}{more}",
            "re-export without them (e.g. a lower/higher opset or decomposed ops); `edgecc inspect` lists all",
        )
    shape_dict = {t.name: list(t.shape) for t in signature.inputs}
    dtype_dict = {t.name: t.dtype for t in signature.inputs}
    importer = _importer_class()(shape_dict, dtype_dict, keep_params_in_input=True, sanitize=True)
    marked = _mark_domains(model.graph)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importer.from_onnx(model.graph, opset)
    except EdgeccError:
        raise
    except Exception as exc:  # noqa: BLE001 - converters raise anything; name the node instead
        op, node = importer.current_node or ("?", "?")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise EdgeccError(
            f"importing node '{node}' ({op}) failed: {first}",
            "this op/attribute combination is not supported yet; re-export the model differently or report it",
        ) from exc
    finally:
        _unmark_domains(marked)
    mod, params = detach_params(mod)
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
    weights = params.get("main", [])
    names = [p.name for p in main.params[num_input:]]
    if len(names) != len(weights):
        raise RuntimeError(f"importer returned {len(weights)} weights for {len(names)} weight parameters")
    return ImportedModel(mod, [(n, w.numpy()) for n, w in zip(names, weights)])
