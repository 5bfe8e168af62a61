"""ONNX -> Relax, with the weights kept apart from the graph.

TVM's importer does the op-by-op work, after edgecc's own converters (`edgecc/frontend/converters`, for
ops TVM lacks or gets wrong; looked up by op type and domain). edgecc adds what a user needs around it:
unsupported ops reported before import, an import failure that names the node it happened at, and the
weights detached as named parameters (so the artifact can store them in `params.bin` instead of baking
them into the library).

Constants are folded on the way in, since edgecc imports for a static signature: a node whose inputs are
all small constants is evaluated with onnx's reference evaluator (`FOLD_MAX_ELEMENTS`), an `If` with a
constant condition becomes the branch it takes, and small int64 initializers (shapes, axes, pads) are
constants rather than weights. That is what lets the shape arithmetic of exported and function-expanded
graphs (Shape -> Gather -> Concat -> Reshape, computed Reduce axes, CastLike of a shape) reach TVM's
converters, which accept constants there but not computed tensors. Quantization ops, randomness, graph
outputs and anything larger stay in the graph.
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


#: Nodes whose inputs are all known constants (and small) are evaluated at import time (onnx's reference
#: evaluator), so that shape arithmetic (Shape -> Gather -> Concat -> Reshape, ReduceMean axes computed from
#: a rank, CastLike of a shape, ...) reaches TVM's converters as constants. Limits in elements, per tensor.
FOLD_MAX_ELEMENTS = 1024
#: Scan and Loop with a static trip count up to this are unrolled (the body converted once per step).
_MAX_UNROLL = 1024
#: int64 initializers up to this size are imported as constants rather than weight parameters.
SHAPE_CONST_MAX_ELEMENTS = 64
#: Never folded: quantization (kept for the compression passes), randomness, control flow, sequences.
_NO_FOLD = {
    "Constant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "If", "Loop", "Scan", "Optional",
    "OptionalGetElement", "OptionalHasElement", "SplitToSequence", "ConcatFromSequence",
}


class _OneNode:
    """A graph-like holder of a single node (TVM's `_construct_nodes` reads only `graph.node`)."""

    def __init__(self, node):
        self.node = [node]


def _importer_class():
    from tvm import ir, relax
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from edgecc.frontend import converters

    class _NodeTrackingImporter(ONNXGraphImporter):
        """Remembers which node is being converted so an error can name it; folds constant nodes."""

        current_node: tuple[str, str] | None = None
        opset_imports: list = []
        graph_outputs: set = set()
        subbyte_types: dict = {}  # value name -> SubByte (edgecc.frontend.subbyte), for containers
        onnx_node = None  # the node being converted (for the sub-byte types of its inputs and outputs)

        def _known(self, expr):
            """The value of an input that is a (small) constant, else None."""
            if isinstance(expr, ir.Constant) and hasattr(expr, "value"):
                value = expr.value.numpy()
            elif isinstance(expr, relax.Var) and expr.name in self._params:
                value = self._params[expr.name][1].numpy()
            elif isinstance(expr, relax.ShapeExpr) and all(hasattr(v, "value") for v in expr.values):
                value = np.array([int(v.value) for v in expr.values], dtype=np.int64)
            else:
                return None
            return value if value.size <= FOLD_MAX_ELEMENTS else None

        def _inline_if(self, node) -> bool:
            """An `If` whose condition is a known constant becomes the nodes of the branch it takes."""
            cond = self._known(self._nodes.get(node.input[0])) if node.input else None
            if cond is None or cond.size != 1:
                return False
            want = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
            branch = next((a.g for a in node.attribute if a.name == want), None)
            if branch is None:
                return False
            for init in branch.initializer:
                self._nodes[init.name] = relax.const(onnx.numpy_helper.to_array(init))
            self._construct_nodes(branch)
            for out, b_out in zip(node.output, branch.output):
                if out:
                    self._nodes[out] = self._nodes[b_out.name]
            return True

        def _run_body(self, body, bindings: dict) -> list:
            """Convert a subgraph's nodes once with its inputs bound; returns its output values."""
            for name, value in bindings.items():
                self._nodes[name] = value
            for init in body.initializer:
                self._nodes[init.name] = relax.const(onnx.numpy_helper.to_array(init))
            self._construct_nodes(body)
            return [self._nodes[o.name] for o in body.output]

        def _stack(self, values: list, axis: int):
            rank = len(values[0].ty.shape.values) + 1
            return self.bb.normalize(relax.op.stack(values, axis=axis % rank))

        def _unroll_scan(self, node) -> bool:
            """Scan (opset >= 9) over a static length: the body converted once per step."""
            from edgecc.frontend.converters._util import static_shape

            if self.opset < 9:
                return False
            attrs = {a.name: a for a in node.attribute}
            body, m = attrs["body"].g, attrs["num_scan_inputs"].i
            values = [self._nodes[n] for n in node.input]
            n_state = len(values) - m
            k = len(body.output) - n_state

            def ints(name, count):
                return list(attrs[name].ints) if name in attrs else [0] * count

            in_axes, in_dirs = ints("scan_input_axes", m), ints("scan_input_directions", m)
            out_axes, out_dirs = ints("scan_output_axes", k), ints("scan_output_directions", k)
            shapes = [static_shape(v) for v in values[n_state:]]
            if any(s is None for s in shapes):
                return False
            in_axes = [a % len(s) for a, s in zip(in_axes, shapes)]
            steps = shapes[0][in_axes[0]] if shapes else 0
            if steps > _MAX_UNROLL:
                return False
            states, collected = values[:n_state], [[] for _ in range(k)]
            for t in range(steps):
                bindings = {body.input[i].name: states[i] for i in range(n_state)}
                for j, (x, axis, rev) in enumerate(zip(values[n_state:], in_axes, in_dirs)):
                    idx = steps - 1 - t if rev else t
                    piece = relax.op.strided_slice(x, axes=[axis], begin=[idx], end=[idx + 1])
                    bindings[body.input[n_state + j].name] = self.bb.normalize(relax.op.squeeze(piece, [axis]))
                outs = self._run_body(body, bindings)
                states = outs[:n_state]
                for j in range(k):
                    collected[j].append(outs[n_state + j])
            results = list(states)
            for j in range(k):
                seq = collected[j][::-1] if out_dirs[j] else collected[j]
                results.append(self._stack(seq, out_axes[j]))
            for name, value in zip(node.output, results):
                if name:
                    self._nodes[name] = value
            return True

        def _unroll_loop(self, node) -> bool:
            """Loop with a constant trip count (or a condition that becomes a known False): unrolled."""
            trip = self._known(self._nodes.get(node.input[0])) if len(node.input) > 0 and node.input[0] else None
            cond = self._known(self._nodes.get(node.input[1])) if len(node.input) > 1 and node.input[1] else None
            if (len(node.input) > 1 and node.input[1] and cond is None) or trip is None:
                return False
            trip = int(trip.reshape(-1)[0])
            if trip > _MAX_UNROLL:
                return False
            body = next(a.g for a in node.attribute if a.name == "body")
            carried = [self._nodes[n] for n in node.input[2:]]
            n_carried = len(carried)
            k = len(body.output) - 1 - n_carried
            collected = [[] for _ in range(k)]
            going = cond is None or bool(cond.reshape(-1)[0])
            cond_value = relax.const(np.array(True))
            for i in range(trip):
                if not going:
                    break
                bindings = {body.input[0].name: relax.const(np.array(i, dtype=np.int64))}
                if len(body.input) > 1:
                    bindings[body.input[1].name] = cond_value
                bindings.update({body.input[2 + j].name: carried[j] for j in range(n_carried)})
                outs = self._run_body(body, bindings)
                known = self._known(outs[0])
                if known is None:
                    raise ValueError("Loop whose condition is computed at run time cannot be unrolled")
                going, cond_value = bool(known.reshape(-1)[0]), outs[0]
                carried = outs[1:1 + n_carried]
                for j in range(k):
                    collected[j].append(outs[1 + n_carried + j])
            if k and not collected[0]:
                return False
            results = list(carried) + [self._stack(c, 0) for c in collected]
            for name, value in zip(node.output, results):
                if name:
                    self._nodes[name] = value
            return True

        def _try_fold(self, node) -> bool:
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                return self._inline_if(node)
            if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
                return self._unroll_scan(node)
            if node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
                return self._unroll_loop(node)
            subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            if any(n in self.subbyte_types for n in list(node.input) + list(node.output)):
                return False  # the evaluator would read a container as its own dtype
            if (node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or node.op_type.startswith("Sequence")
                    or not node.input or subgraphs or any(o in self.graph_outputs for o in node.output)):
                return False
            feeds = {}
            for name in node.input:
                if not name or name in feeds:
                    continue
                value = self._known(self._nodes.get(name))
                if value is None:
                    return False
                feeds[name] = value
            try:
                from onnx import helper
                from onnx.reference import ReferenceEvaluator

                ins = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                       for n, v in feeds.items()]
                outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
                model = helper.make_model(helper.make_graph([node], "fold", ins, outs),
                                          opset_imports=self.opset_imports)
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    results = ReferenceEvaluator(model).run(None, feeds)
                values = [np.asarray(r) for r in results]
                if any(v.dtype == object or v.size > FOLD_MAX_ELEMENTS for v in values):
                    return False
                consts = [relax.const(v, str(v.dtype)) for v in values]
            except Exception:  # noqa: BLE001 - anything the evaluator cannot do is left to the converters
                return False
            for name, c in zip([o for o in node.output if o], consts):
                self._nodes[name] = c
            return True

        def _parse_graph_initializers(self, graph):
            """Small int64 initializers (shapes, axes, pads, indices) are constants, not weights; so is an
            initializer that is itself a graph output (a weight `main` returned as is would lose its
            binding in LiftTransformParams: "Var gv is not defined" at VM codegen)."""
            super()._parse_graph_initializers(graph)
            for init in graph.initializer:
                name = init.name.removeprefix("onnx::")
                entry = self._params.get(name)
                if entry is None:
                    continue
                if init.name in self.graph_outputs:
                    del self._params[name]
                    value = entry[1].numpy()
                    self._nodes[init.name] = relax.const(value, str(value.dtype))
                elif init.data_type == onnx.TensorProto.INT64 and int(np.prod(init.dims)) <= SHAPE_CONST_MAX_ELEMENTS:
                    del self._params[name]
                    self._nodes[init.name] = relax.const(entry[1].numpy(), "int64")

        def _construct_nodes(self, graph):
            for node in graph.node:
                if not self._try_fold(node):
                    self.onnx_node = node
                    super()._construct_nodes(_OneNode(node))

        def _convert_operator(self, op_name, inputs, attrs, opset):  # noqa: D401 - TVM override
            self.current_node = (op_name, attrs.get("tvm_custom", {}).get("name", "?"))
            domain = attrs.pop(converters.DOMAIN_ATTR, b"")
            sym = self._convert_subbyte(op_name, inputs, attrs)
            if sym is not NotImplemented:
                return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
            convert = converters.lookup(op_name, domain.decode() if isinstance(domain, bytes) else domain)
            if convert is not None:  # edgecc's own converter (edgecc/frontend/converters) first
                sym = convert(self.bb, inputs, attrs, [self._nodes, self._params], opset)
                if sym is not NotImplemented:
                    return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
            return super()._convert_operator(op_name, inputs, attrs, opset)

        def _convert_subbyte(self, op_name, inputs, attrs):
            """A node reading or writing a sub-byte value (int4 etc. held in a byte container)."""
            from edgecc.frontend.converters import subbyte
            from edgecc.frontend.subbyte import SUBBYTE

            node = self.onnx_node
            if node is None or node.op_type != op_name or not converters.enabled():
                return NotImplemented
            in_types = [self.subbyte_types.get(n) if n else None for n in node.input]
            out_types = [self.subbyte_types.get(n) if n else None for n in node.output]
            to = attrs.get("to")
            if not (any(in_types) or any(out_types) or (op_name == "Cast" and to is not None and int(to) in SUBBYTE)):
                return NotImplemented
            return subbyte.convert(self.bb, op_name, inputs, attrs, [self._nodes, self._params], self.opset,
                                   in_types, out_types)

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
    """Import with the given input signature (symbolic dims, named by strings, become shared tirx Vars)."""
    from tvm.relax.frontend import detach_params

    from edgecc.frontend.subbyte import lower_model

    opset = default_opset(model)
    unsupported = find_unsupported(model, opset)
    if unsupported:
        listed = "; ".join(u.describe() for u in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise EdgeccError(
            f"the model uses ops edgecc cannot import: {listed}{more}",
            "re-export without them (e.g. a lower/higher opset or decomposed ops); `edgecc inspect` lists all",
        )
    sym_vars: dict = {}  # one tirx.Var per symbolic dim name, shared by every input that uses it

    def _dim(d):
        if isinstance(d, str):
            import tvm

            return sym_vars.setdefault(d, tvm.tirx.Var(d, "int64"))
        return d

    shape_dict = {t.name: [_dim(d) for d in t.shape] for t in signature.inputs}
    dtype_dict = {t.name: t.dtype for t in signature.inputs}
    importer = _importer_class()(shape_dict, dtype_dict, keep_params_in_input=True, sanitize=True)
    importer.opset_imports = list(model.opset_import)
    importer.graph_outputs = {o.name for o in model.graph.output}  # a graph output stays a computed value
    model, importer.subbyte_types = lower_model(model)  # int4/float4/...: one element per byte
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
