"""Compression as first-class Relax IR: the annotated ops, their legalization, and how to list them.

Carrier (see docs/compression.md for the full design):

* A compressed layer is one call of a Python-registered Relax op, `edgecc.quantized_matmul(x, qweight,
  scales[, zeros])`, whose per-call `DictAttrs` carry the annotation dict: `kind` ("quant"), `scheme`,
  `bits`, `group_size`, `axis`, `symmetric`, `act_bits`, `storage`, `scale_dtype`, `zero_offset`,
  `in_features`, `out_features`, `orig_dtype`, `orig_bytes`, `packed_bytes` and `name` (the source weight).
  The packed tensors are ordinary parameters of `main` (after `num_input`), so they go to params.bin as
  they are. The op is pure, has a type rule, and is opaque to every generic pass before legalization
  (LiftTransformParams, FoldConstant, DCE, CSE, canonicalization keep it and its attrs as they are).
* `LegalizeOps` calls the op's `FLegalize` (registered here): it builds the kernel of
  `edgecc.schedules.quantized` for the current target, already scheduled, and emits one `call_tir` to it.
  The PrimFunc carries the scheme as the function attribute `edgecc.compression` (the same dict minus the
  per-layer fields, so layers of one shape and scheme share a kernel), plus `op_pattern` = opaque (FuseOps
  leaves it alone, FuseTIR never rewrites it, so the attribute reaches code generation) and
  `tirx.is_scheduled` (the default fp32 rules skip it).
* Other kinds (sparse, low rank) are further ops of the same family with the same attribute convention:
  a `kind` key, the kind's parameters, `in_features`/`out_features`/`name`/`orig_bytes`/`packed_bytes`.
  `annotated_ops` and `annotated_kernels` list any op in `COMPRESSED_OPS` / any PrimFunc with the attr.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import relax, tirx

from edgecc.compress.schemes import QuantScheme

QUANT_MATMUL = "edgecc.quantized_matmul"
#: every Relax op that carries a compression annotation (sparse / low-rank ops join this list)
COMPRESSED_OPS = (QUANT_MATMUL,)
#: PrimFunc attribute holding the scheme dict of a compressed kernel
KERNEL_ATTR = "edgecc.compression"
#: keys that describe one layer rather than the scheme (not copied onto the shared kernel)
LAYER_KEYS = ("name", "orig_bytes", "packed_bytes", "orig_dtype")
OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque

# ------------------------------------------------------------------------------------------ helpers


def _py(value):
    """FFI containers / IR scalars -> plain Python values."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tirx.IntImm):
        return bool(value.value) if value.dtype == "bool" else int(value.value)
    if isinstance(value, tirx.FloatImm):
        return float(value.value)
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): _py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        return [_py(v) for v in value]
    return str(value)


def attrs_dict(attrs) -> dict:
    """A call's DictAttrs (or a PrimFunc's attr Map) as a plain dict."""
    if attrs is None:
        return {}
    keys = list(attrs.keys())
    return {str(k): _py(attrs[k]) for k in keys}


def _static_dims(shape) -> list:
    return [int(d) if isinstance(d, tirx.IntImm) else d for d in shape]


# ------------------------------------------------------------------------------------------ the op


def _infer_type(call: relax.Call, _ctx=None):
    x = call.args[0].ty
    n = int(call.attrs["out_features"])
    if not isinstance(x, relax.TensorType) or x.shape is None:
        return relax.TensorType(ndim=-1, dtype=x.dtype if isinstance(x, relax.TensorType) else "float32")
    dims = list(x.shape.values)[:-1] + [n]
    return relax.TensorType(dims, x.dtype)


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    from edgecc.schedules.quantized import SCHEDULE_NAME, quantized_matmul_primfunc

    attrs = attrs_dict(call.attrs)
    scheme = QuantScheme.from_attrs(attrs)
    x = call.args[0]
    xt = x.ty
    k, n = int(attrs["in_features"]), int(attrs["out_features"])
    dims = _static_dims(xt.shape.values)
    lead = dims[:-1]
    if len(lead) == 1:
        m, x2 = lead[0], x
    else:
        m = 1
        for d in lead:
            m = m * d
        x2 = bb.normalize(relax.op.reshape(x, [m, k]))
    target = tvm.target.Target.current(allow_none=True)
    func, scheduled = quantized_matmul_primfunc(m, k, n, scheme, target, x_dtype=str(xt.dtype))
    kernel_attrs = {key: val for key, val in attrs.items() if key not in LAYER_KEYS}
    func = func.with_attr(KERNEL_ATTR, kernel_attrs).with_attr("op_pattern", OP_PATTERN_OPAQUE)
    if scheduled:
        func = func.with_attr("tirx.is_scheduled", True).with_attr("edgecc.schedule", SCHEDULE_NAME)
    mdesc = m if isinstance(m, int) else "m"
    gv = bb.add_func(func, f"qmatmul_{scheme.name.replace('-', '_')}_{mdesc}x{k}x{n}")
    out = relax.call_tir(gv, [x2, *call.args[1:]], relax.TensorType([m, n], xt.dtype))
    if len(lead) == 1:
        return out
    return relax.op.reshape(bb.normalize(out), [*lead, n])


def register_ops() -> None:
    """Register the compressed ops once per process (importing this module does it)."""
    names = set(tvm.ir.Op.list_op_names())
    if QUANT_MATMUL in names and tvm.ir.Op.get(QUANT_MATMUL).has_attr("FLegalize"):
        return
    if QUANT_MATMUL not in names:
        tvm.ir._ffi_api.RegisterOp(QUANT_MATMUL, "matmul with a quantized, packed right operand")
    op = tvm.ir.Op.get(QUANT_MATMUL)
    op.set_num_inputs(4)
    op.add_argument("x", "Tensor", "activations [..., in_features]")
    op.add_argument("qweight", "Tensor", "packed codes")
    op.add_argument("scales", "Tensor", "per-group scales [groups, out_features]")
    op.add_argument("zeros", "Tensor", "per-group zero points (asymmetric schemes only)")
    op.set_attr("FPurity", True)
    op.set_attr("FInferType", _infer_type)
    op.set_attr("FLegalize", _legalize)


register_ops()


def quantized_matmul(x: relax.Expr, qweight: relax.Expr, scales: relax.Expr, zeros: relax.Expr | None,
                     annotation: dict) -> relax.Call:
    """Build one `edgecc.quantized_matmul` call carrying `annotation` (see module docstring)."""
    args = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    attrs = tvm.ir.make_node("ir.DictAttrs", **annotation)
    return relax.Call(tvm.ir.Op.get(QUANT_MATMUL), args, attrs)


# ------------------------------------------------------------------------------------------ listing


def _walk_calls(func: relax.Function):
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in COMPRESSED_OPS:
            found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def annotated_ops(mod: tvm.IRModule) -> list[dict]:
    """Every compressed op call in the Relax functions of `mod` (before legalization): its annotation
    dict plus `op` (the op name) and `function`."""
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for call in _walk_calls(func):
            entry = {"op": call.op.name, "function": gv.name_hint}
            entry.update(attrs_dict(call.attrs))
            out.append(entry)
    return out


def annotated_kernels(mod: tvm.IRModule) -> dict[str, dict]:
    """PrimFunc name -> scheme dict, for every kernel generated from a compressed op (after legalization)."""
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs:
            out[gv.name_hint] = attrs_dict(func.attrs[KERNEL_ATTR])
    return out
