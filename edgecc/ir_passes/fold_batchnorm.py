"""Relax graph rewrites that let convolutions absorb what follows them (CNNs exported from ONNX).

`fold_batchnorm_pass()` rewrites, in every Relax function:

* **inference BatchNorm** `R.nn.batch_norm(x, gamma, beta, mean, var, training=False)[0]` into a per-channel
  scale and shift, `x * reshape(s) + reshape(t)` with `s = gamma / sqrt(var + eps)` and `t = beta - mean * s`.
  TVM legalizes `batch_norm` into a kernel with three outputs (the moving statistics too), which FuseOps
  cannot fuse into the convolution before it: every BatchNorm was a separate pass over the activations.
  As a multiply-add on `[C]` vectors it becomes the convolution's epilogue (computed at the register tile,
  together with the ReLU and the residual add). `s` and `t` depend on weights only: tiny `[C]` kernels at
  run time, or computed once at build time when the pass runs before `LiftTransformParams`.
* **`Sum` of n tensors**, which the ONNX importer writes as `sum(stack(broadcast_to(a), broadcast_to(b)),
  axis=0)` (ResNet's residual add), into `a + b`: the stacked copy and the reduction over it disappear
  and the add fuses into the convolution's epilogue as well.

Training-mode BatchNorm, a BatchNorm whose statistics outputs are used, and stacks whose sum is not over
the stacked axis are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, is_tuple_get_item, rewrite_call, wildcard

R = relax.op


def _ndim(expr) -> int | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return len(shape)
    except TypeError:
        return None


def _dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _batchnorm_rewriter():
    x, gamma, beta, mean, var = wildcard(), wildcard(), wildcard(), wildcard(), wildcard()
    bn = is_op("relax.nn.batch_norm")(x, gamma, beta, mean, var)
    pattern = is_tuple_get_item(bn, 0)

    def rewrite(expr, matches):
        call = matches[bn]
        attrs = call.attrs
        if bool(attrs.training):
            return expr
        data = matches[x]
        ndim = _ndim(data)
        dtype = _dtype(data)
        if ndim is None or not dtype.startswith("float"):
            return expr
        axis = int(attrs.axis) % ndim
        shape = [1] * ndim
        shape[axis] = data.ty.shape[axis]

        def per_channel(v):  # [C] -> [1, C, 1, 1] (the statistics are typed vars: reshape can infer)
            return R.reshape(matches[v], shape)

        eps = relax.const(float(attrs.epsilon), dtype)
        scale = R.divide(relax.const(1.0, dtype), R.sqrt(R.add(per_channel(var), eps)))
        if bool(attrs.scale):
            scale = R.multiply(per_channel(gamma), scale)
        shift = R.negative(R.multiply(per_channel(mean), scale))
        if bool(attrs.center):
            shift = R.add(per_channel(beta), shift)
        return R.add(R.multiply(data, scale), shift)

    return pattern, rewrite


def _stack_sum_rewriter():
    items = wildcard()
    stack = is_op("relax.stack")(items)
    pattern = is_op("relax.sum")(stack)

    def rewrite(expr, matches):
        stack_call = matches[stack]
        tup = stack_call.args[0]
        if not isinstance(tup, relax.Tuple) or len(tup.fields) < 1:
            return expr
        sum_attrs = expr.attrs
        axes = sum_attrs.axis
        stack_axis = stack_call.attrs.axis
        stack_axis = 0 if stack_axis is None else int(stack_axis)
        if axes is None or len(axes) != 1 or bool(sum_attrs.keepdims):
            return expr
        ndim = _ndim(stack_call)
        if ndim is None or int(axes[0]) % ndim != stack_axis % ndim:
            return expr
        fields = list(tup.fields)
        if not all(_dtype(f) == _dtype(expr) for f in fields):
            return expr
        out = fields[0]
        for f in fields[1:]:
            out = R.add(out, f)
        if len(fields) == 1:
            out = R.add(out, relax.const(0.0, _dtype(expr)))  # keep a fresh value (no aliasing of the input)
        return out

    return pattern, rewrite


def fold_batchnorm_function(func: relax.Function) -> relax.Function:
    """Apply both rewrites to one Relax function (unused BatchNorm calls are dropped)."""
    for make in (_batchnorm_rewriter, _stack_sum_rewriter):
        pattern, rewrite = make()
        func = rewrite_call(pattern, rewrite, func)
    return relax.analysis.remove_all_unused(func)


def fold_batchnorm_pass() -> tvm.transform.Pass:
    """The module pass (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="EdgeccFoldBatchNorm")
    def _pass(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = fold_batchnorm_function(func)
                if not new.same_as(func):
                    updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod.update_func(gv, func)
        return mod

    return _pass
