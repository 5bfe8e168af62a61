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
* `edgecc.quantized_gather(indices, qweight, scales[, zeros])` is the embedding lookup `table[indices]` of a
  quantized [V, D] table, stored exactly like the right operand of `x @ table^T` (in_features = D, the axis
  groups run along; out_features = V), so a tied lm_head can use the same packed tensors. Its kernel
  dequantizes only the gathered rows.
* `edgecc.quantized_conv2d(x, qweight, scales[, zeros])` is an NCHW, groups-1 conv2d whose [O, C, kh, kw]
  weight is stored as the [K = C*kh*kw, N = O] right operand of its im2col matmul; the call's attrs add the
  geometry (`strides`, `padding`, `dilation`, `kernel`). Legalized to one direct (implicit-GEMM) NCHW conv
  kernel that decodes the packed weight itself (`edgecc.schedules.quantized_conv`; w8a8 adds a kernel that
  puts the input on its int8 grid first).
* Other kinds (sparse, low rank) are further ops of the same family with the same attribute convention:
  a `kind` key, the kind's parameters, `in_features`/`out_features`/`name`/`orig_bytes`/`packed_bytes`.
  `annotated_ops` and `annotated_kernels` list any op in `COMPRESSED_OPS` / any PrimFunc with the attr.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import relax, tirx

from edgecc.compress.schemes import QuantScheme
from edgecc.schedules.te_conv import conv_out_hw

QUANT_MATMUL = "edgecc.quantized_matmul"
QUANT_GATHER = "edgecc.quantized_gather"
QUANT_CONV2D = "edgecc.quantized_conv2d"
#: every Relax op that carries a compression annotation (sparse / low-rank ops join this list)
COMPRESSED_OPS = (QUANT_MATMUL, QUANT_GATHER, QUANT_CONV2D)
#: PrimFunc attribute holding the scheme dict of a compressed kernel
KERNEL_ATTR = "edgecc.compression"
#: keys that describe one layer rather than the scheme (not copied onto the shared kernel)
LAYER_KEYS = ("name", "orig_bytes", "packed_bytes", "orig_dtype", "source")
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


def _infer_gather_type(call: relax.Call, _ctx=None):
    idx = call.args[0].ty
    d = int(call.attrs["in_features"])
    dtype = str(call.attrs["orig_dtype"]) if "orig_dtype" in call.attrs else "float32"
    if not isinstance(idx, relax.TensorType) or idx.shape is None:
        return relax.TensorType(ndim=-1, dtype=dtype)
    return relax.TensorType(list(idx.shape.values) + [d], dtype)


def _legalize_gather(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    from edgecc.schedules.quantized import quantized_gather_primfunc

    attrs = attrs_dict(call.attrs)
    scheme = QuantScheme.from_attrs(attrs)
    idx = call.args[0]
    d, v = int(attrs["in_features"]), int(attrs["out_features"])
    dims = _static_dims(idx.ty.shape.values)
    m = 1
    for dim in dims:
        m = m * dim
    flat = bb.normalize(relax.op.reshape(idx, [m]))
    dtype = str(attrs.get("orig_dtype", "float32"))
    func, scheduled = quantized_gather_primfunc(m, d, v, scheme, str(idx.ty.dtype), dtype)
    kernel_attrs = {key: val for key, val in attrs.items() if key not in LAYER_KEYS}
    func = func.with_attr(KERNEL_ATTR, kernel_attrs).with_attr("op_pattern", OP_PATTERN_OPAQUE)
    if scheduled:
        func = func.with_attr("tirx.is_scheduled", True).with_attr("edgecc.schedule", "quantized_gather")
    mdesc = m if isinstance(m, int) else "m"
    gv = bb.add_func(func, f"qgather_{scheme.name.replace('-', '_')}_{mdesc}x{v}x{d}")
    out = bb.normalize(relax.call_tir(gv, [flat, *call.args[1:]], relax.TensorType([m, d], dtype)))
    return relax.op.reshape(out, [*dims, d])


# conv2d (NCHW / OIHW, groups 1): the [O, C, kh, kw] weight is quantized as the [K = C*kh*kw, N = O] weight
# of an im2col matmul (k = c*kh*kw + i*kw + j); the call carries the conv geometry next to the annotation:
# `strides` [2], `padding` [top, left, bottom, right], `dilation` [2], `kernel` [kh, kw].


def _infer_conv_type(call: relax.Call, _ctx=None):
    x = call.args[0].ty
    if not isinstance(x, relax.TensorType) or x.shape is None:
        return relax.TensorType(ndim=4, dtype=x.dtype if isinstance(x, relax.TensorType) else "float32")
    n, _, h, w = list(x.shape.values)
    oh, ow = conv_out_hw(h, w, attrs_dict(call.attrs))
    return relax.TensorType([n, int(call.attrs["out_features"]), oh, ow], x.dtype)


def _legalize_conv(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    from edgecc.schedules.quantized_conv import (SCHEDULE_NAME, act_quant_primfunc, quantized_conv2d_primfunc,
                                                 use_matmul_form, weight_decode_primfunc)

    attrs = attrs_dict(call.attrs)
    scheme = QuantScheme.from_attrs(attrs)
    x = call.args[0]
    n, c, h, w = (int(d) for d in x.ty.shape.values)
    oh, ow = conv_out_hw(h, w, attrs)
    o = int(attrs["out_features"])
    dtype = str(x.ty.dtype)
    target = tvm.target.Target.current(allow_none=True)
    if scheme.act_bits == 8:  # the input on its int8 grid first (edgecc.schedules.quantized_conv docstring)
        gq = bb.add_func(act_quant_primfunc(n, c * h * w, target, dtype), f"qconv_act_quant_{n}x{c * h * w}")
        flat = bb.normalize(relax.op.reshape(x, [n, c * h * w]))
        xq = bb.normalize(relax.call_tir(gq, [flat], relax.TensorType([n, c * h * w], dtype)))
        x = bb.normalize(relax.op.reshape(xq, [n, c, h, w]))
    kernel_attrs = {key: val for key, val in attrs.items() if key not in LAYER_KEYS}
    (sh, sw), (kh, kw) = attrs["strides"], attrs["kernel"]
    tag = f"{scheme.name.replace('-', '_')}_{c}x{h}x{w}_{o}x{kh}x{kw}_s{sh}x{sw}"
    if use_matmul_form(attrs, oh * ow, target) and dtype == "float32":
        # 1x1 conv as a matmul on the decoded weight: y[n] = W[O, C] @ x[n][C, H*W] (see use_matmul_form)
        k = int(attrs["in_features"])
        dec = weight_decode_primfunc(k, o, scheme, target).with_attr(KERNEL_ATTR, kernel_attrs)
        dec = dec.with_attr("op_pattern", OP_PATTERN_OPAQUE)
        if "tirx.is_scheduled" in dec.attrs:
            dec = dec.with_attr("edgecc.schedule", SCHEDULE_NAME)
        gd = bb.add_func(dec, f"qconv2d_decode_{tag}")
        wf = bb.normalize(relax.call_tir(gd, list(call.args[1:]), relax.TensorType([o, k], "float32")))
        flat = bb.normalize(relax.op.reshape(x, [n, c, h * w]))
        y = bb.normalize(relax.op.matmul(wf, flat))
        return relax.op.reshape(y, [n, o, oh, ow])
    func, scheduled = quantized_conv2d_primfunc(n, c, h, w, o, attrs, scheme, target, dtype)
    func = func.with_attr(KERNEL_ATTR, kernel_attrs).with_attr("op_pattern", OP_PATTERN_OPAQUE)
    if scheduled:
        func = func.with_attr("tirx.is_scheduled", True).with_attr("edgecc.schedule", SCHEDULE_NAME)
    gv = bb.add_func(func, f"qconv2d_{tag}")
    return relax.call_tir(gv, [x, *call.args[1:]], relax.TensorType([n, o, oh, ow], dtype))


#: call attrs of a quantized conv that describe the convolution (the rest is the annotation of its weight)
CONV_KEYS = ("strides", "padding", "dilation", "kernel")


def _register(name: str, doc: str, first: tuple[str, str], infer, legalize) -> None:
    if name not in set(tvm.ir.Op.list_op_names()):
        tvm.ir._ffi_api.RegisterOp(name, doc)
    op = tvm.ir.Op.get(name)
    if op.get_attr("FLegalize") is not None:  # (has_attr says whether *any* op has the attribute)
        return
    op.set_num_inputs(4)
    op.add_argument(first[0], "Tensor", first[1])
    op.add_argument("qweight", "Tensor", "packed codes")
    op.add_argument("scales", "Tensor", "per-group scales [groups, out_features]")
    op.add_argument("zeros", "Tensor", "per-group zero points (asymmetric schemes only)")
    op.set_attr("FPurity", True)
    op.set_attr("FInferType", infer)
    op.set_attr("FLegalize", legalize)


def register_ops() -> None:
    """Register the compressed ops once per process (importing this module does it)."""
    _register(QUANT_MATMUL, "matmul with a quantized, packed right operand",
              ("x", "activations [..., in_features]"), _infer_type, _legalize)
    _register(QUANT_GATHER, "rows of a quantized, packed embedding table",
              ("indices", "row indices, any shape"), _infer_gather_type, _legalize_gather)
    _register(QUANT_CONV2D, "NCHW conv2d with a quantized, packed [C*kh*kw, O] weight (direct conv kernel)",
              ("x", "activations [N, C, H, W]"), _infer_conv_type, _legalize_conv)


register_ops()


def quantized_matmul(x: relax.Expr, qweight: relax.Expr, scales: relax.Expr, zeros: relax.Expr | None,
                     annotation: dict) -> relax.Call:
    """Build one `edgecc.quantized_matmul` call carrying `annotation` (see module docstring)."""
    args = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    attrs = tvm.ir.make_node("ir.DictAttrs", **annotation)
    return relax.Call(tvm.ir.Op.get(QUANT_MATMUL), args, attrs)


def quantized_gather(indices: relax.Expr, qweight: relax.Expr, scales: relax.Expr, zeros: relax.Expr | None,
                     annotation: dict) -> relax.Call:
    """Build one `edgecc.quantized_gather` call (rows `indices` of the table; see module docstring)."""
    args = [indices, qweight, scales] + ([zeros] if zeros is not None else [])
    attrs = tvm.ir.make_node("ir.DictAttrs", **annotation)
    return relax.Call(tvm.ir.Op.get(QUANT_GATHER), args, attrs)


def quantized_conv2d(x: relax.Expr, qweight: relax.Expr, scales: relax.Expr, zeros: relax.Expr | None,
                     annotation: dict) -> relax.Call:
    """Build one `edgecc.quantized_conv2d` call; `annotation` also holds the CONV_KEYS geometry."""
    args = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    attrs = tvm.ir.make_node("ir.DictAttrs", **annotation)
    return relax.Call(tvm.ir.Op.get(QUANT_CONV2D), args, attrs)


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
