"""Pointwise (1x1) convolutions as a GEMM whose vector axis is the output's contiguous axis.

    y = conv2d(x, W)    x: [1, ci, H, W]           x2 = reshape(x[:, :, ::s, ::s], [ci, P])     (P = Ho * Wo)
    z = f(y, ...)       W: [co, ci, 1, 1]   ─▶     z2 = f(matmul(W2, x2), ...)                 W2: [co, ci]
                                                   z  = reshape(z2, [1, co, Ho, Wo])

Why: the conv template (`schedules/conv2d.py`) vectorizes over output channels, while an NCHW output is
contiguous along x: every output tile was transposed element by element in its epilogue, and 1x1 convs ran
at about half the speed of the 3x3 ones. As `W2 @ x2` the vector axis is P, the columns of a row-major B,
the case the matmul template runs at onnxruntime speed (MiniLM / prefill GEMMs). The reshapes are views,
never copies (RewriteDataflowReshape); a stride s > 1 first takes `x[:, :, ::s, ::s]` (a small copy).

The elementwise ops that follow the convolution (BatchNorm's scale and shift, bias, the residual add, ReLU)
move to the 2-D side with it, their [1, co, 1, 1] operands reshaped to [co, 1] and [1, co, Ho, Wo] ones to
[co, P]: between a matmul and its epilogue a reshape would stop FuseOps from fusing them (an injective op
is not on the elementwise path FuseOps needs), so the output would make an extra pass through memory.
BatchNorm is therefore folded first (`fold_batchnorm`, the same rewrite the pipeline runs later).

What is rewritten, in one function: `R.nn.conv2d` with a 1x1 kernel, groups 1, no padding, NCHW/OIHW
layouts, batch 1, static float shapes and a weight parameter (after `num_input`). Not rewritten: 3x3 and
larger kernels, grouped/depthwise convs, padded 1x1 convs, batch > 1, weights computed in the graph, and
(in builds) output sizes P the GEMM template would pad (`tile_fits`: 14x14 and 7x7 outputs on AVX-512). A
weight whose every use is rewritten is stored as [co, ci] (reshaped here, at build time); otherwise it keeps
its shape and the graph reshapes it (a view).

`EDGECC_CONV1X1_GEMM=0` turns it off (for A/B timing), `=all` rewrites every output size.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from edgecc.ir_passes.fold_batchnorm import fold_batchnorm_function
from edgecc.ir_passes.rebind import op_name, replace_bindings, static_dims, var_uses, weight_params, with_function
from edgecc.schedules.contraction import choose_tile_width
from edgecc.schedules.params import cpu_params
from edgecc.targets.registry import TargetSpec

R = relax.op


#: elementwise ops that follow the convolution onto the 2-D side (their other operands are reshaped)
_ELEMENTWISE = {
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
    "relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu",
    "relax.negative", "relax.exp",
}


def _conv1x1(call, weights: set, columns_ok):
    """(x dims, W dims, output dims, strides) when `call` is a convolution this pass rewrites, else None."""
    if op_name(call) != "relax.nn.conv2d":
        return None
    x, w = call.args
    a = call.attrs
    if w not in weights or int(a.groups) != 1 or any(int(p) != 0 for p in a.padding):
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    if a.out_dtype is not None and str(a.out_dtype) not in ("", "void", str(x.ty.dtype)):
        return None
    xd, wd, yd = static_dims(x.ty), static_dims(w.ty), static_dims(call.ty)
    if xd is None or wd is None or yd is None or len(xd) != 4 or xd[0] != 1 or wd[2:] != [1, 1]:
        return None
    if str(x.ty.dtype) != str(w.ty.dtype) or not str(x.ty.dtype).startswith("float"):
        return None
    strides = [int(s) for s in a.strides]
    if not columns_ok(yd[2] * yd[3]):
        return None
    return xd, wd, yd, strides


def _as_columns(other, co: int, p: int, yd: list):
    """How `other` (an operand next to the [1, co, Ho, Wo] output) reads on the [co, P] side: "scalar"
    (keep it), a target shape to reshape it to, or None (not a shape this rewrite moves)."""
    d = static_dims(getattr(other, "ty", None))
    if d is None or len(d) > 4:
        return None
    if int(np.prod(d)) == 1:
        return "scalar" if len(d) <= 2 else [1, 1]  # a [1, 1, 1, 1] operand would make the result 4-D
    d4 = [1] * (4 - len(d)) + d
    if d4 == [1, co, 1, 1]:
        return [co, 1]
    if d4 == yd:
        return [co, p]
    return None


def conv1x1_as_matmul(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], func_name: str = "main",
                      columns_ok: Callable[[int], bool] = lambda p: True):
    """-> (module, named weights, number of convolutions rewritten). See the module docstring.

    `columns_ok(P)`: whether a convolution with P output columns is rewritten (the build: `tile_fits`)."""
    func = mod[func_name]
    if "num_input" not in (func.attrs or {}):
        return mod, list(named_weights), 0
    num_input, wvars = weight_params(func, named_weights, func_name)
    convs = []
    for block in func.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and _conv1x1(b.value, set(wvars), columns_ok) is not None:
                    convs.append(b)
    if not convs:
        return mod, list(named_weights), 0
    func = fold_batchnorm_function(func)  # BatchNorm -> multiply/add, so it follows the conv to 2-D
    bindings = {}
    for block in func.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bindings[b.var] = b
    users: dict = {}  # var -> the bindings that read it
    for b in bindings.values():
        def _visit(expr, b=b):
            if isinstance(expr, relax.Var) and expr in bindings:
                users.setdefault(expr, []).append(b)

        relax.analysis.post_order_visit(b.value, _visit)
    uses = var_uses(func)
    weights = set(wvars)

    bb = relax.BlockBuilder()
    replace: dict = {}
    claimed: set = set()
    ends: dict = {}  # [1, co, Ho, Wo] var at the end of a rewritten chain -> its [co, P] value
    rewritten_w: dict = {}  # weight var -> number of rewritten uses
    new_w: dict = {}  # weight var -> its [co, ci] parameter
    count = 0
    for b in bindings.values():
        found = _conv1x1(b.value, weights, columns_ok)
        if found is None:
            continue
        xd, wd, yd, strides = found
        x, w = b.value.args
        co, ci = wd[0], wd[1]
        p = yd[2] * yd[3]
        dtype = str(x.ty.dtype)
        name = b.var.name
        if w not in new_w:
            new_w[w] = relax.Var(w.name + "_cols", relax.TensorType([co, ci], dtype))
        rewritten_w[w] = rewritten_w.get(w, 0) + 1
        out = []

        def bind(suffix, value, ty_dims):
            var = relax.DataflowVar(f"{name}_{suffix}", relax.TensorType(ty_dims, dtype))
            out.append(relax.VarBinding(var, bb.normalize(value)))
            return var

        src = x
        if strides == [1, 1] and _through_broadcasts(x, bindings) in ends:
            src = ends[_through_broadcasts(x, bindings)]  # the previous GEMM's [ci, P] output itself
        elif strides != [1, 1]:
            src = bind("strided", R.strided_slice(x, axes=[2, 3], begin=[0, 0], end=xd[2:], strides=strides),
                       [1, ci, yd[2], yd[3]])
        x2 = src if static_dims(src.ty) == [ci, p] else bind("cols", R.reshape(src, [ci, p]), [ci, p])
        cur = bind("gemm", R.matmul(new_w[w], x2), [co, p])
        replace[b.var] = out
        last_var, last_list = b.var, out
        # follow the single-use chain of elementwise ops onto the [co, P] side
        while uses.get(last_var, 0) == 1 and len(users.get(last_var, [])) == 1:
            nxt = users[last_var][0]
            call = nxt.value
            if nxt.var in claimed or nxt.var in replace or static_dims(nxt.var.ty) != yd:
                break
            if op_name(call) == "relax.broadcast_to" and call.args[0].same_as(last_var):
                claimed.add(nxt.var)  # to its own shape (the importer's Sum): nothing to do on the 2-D side
                last_var, last_list = nxt.var, []
                replace[nxt.var] = last_list
                continue
            if op_name(call) not in _ELEMENTWISE or str(nxt.var.ty.dtype) != dtype:
                break
            args, ok, pre = [], True, []
            for arg in call.args:
                if arg.same_as(last_var):
                    args.append(cur)
                    continue
                how = _as_columns(arg, co, p, yd)
                if how is None:
                    ok = False
                    break
                if how == "scalar":
                    args.append(arg)
                elif how == [co, p] and _through_broadcasts(arg, bindings) in ends:
                    args.append(ends[_through_broadcasts(arg, bindings)])  # another GEMM's output (residual)
                else:
                    v = relax.DataflowVar(f"{nxt.var.name}_arg{len(pre)}",
                                          relax.TensorType(how, str(arg.ty.dtype)))
                    pre.append(relax.VarBinding(v, bb.normalize(R.reshape(arg, how))))
                    args.append(v)
            if not ok or sum(1 for a in call.args if a.same_as(last_var)) != 1:
                break
            claimed.add(nxt.var)
            new_list = list(pre)
            v2 = relax.DataflowVar(f"{nxt.var.name}_cols", relax.TensorType([co, p], dtype))
            new_list.append(relax.VarBinding(v2, bb.normalize(relax.Call(call.op, args, call.attrs,
                                                                              call.ty_args))))
            replace[nxt.var] = new_list
            cur, last_var, last_list = v2, nxt.var, new_list
        last_list.append(relax.VarBinding(last_var, bb.normalize(R.reshape(cur, yd))))
        ends[last_var] = cur
        count += 1

    body = replace_bindings(func, replace)
    new_params = list(func.params[:num_input])
    named = []
    extra = {}
    for v, (pname, arr) in zip(wvars, named_weights):
        if v in new_w and uses.get(v, 0) == rewritten_w[v]:
            new_params.append(new_w[v])
            named.append((pname, np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1]))))
        else:
            new_params.append(v)
            named.append((pname, arr))
            if v in new_w:  # also read elsewhere: keep the 4-D weight, reshape it in the graph (a view)
                extra[new_w[v]] = R.reshape(v, [int(d) for d in new_w[v].ty.shape])
    if extra:
        body = _bind_first(body, extra, bb)
    return with_function(mod, func_name, func, new_params, body, bb), named, count


def _through_broadcasts(var, bindings: dict):
    """`var`, or what it broadcasts to its own shape (the importer's Sum writes `broadcast_to(a, a.shape)`)."""
    while var in bindings:
        value = bindings[var].value
        if op_name(value) != "relax.broadcast_to" or static_dims(value.args[0].ty) != static_dims(var.ty):
            break
        var = value.args[0]
    return var


def _bind_first(body: relax.SeqExpr, extra: dict, bb) -> relax.SeqExpr:
    """`body` with `var = value` bindings for `extra` at the start of its first dataflow block."""
    blocks = list(body.blocks)
    for n, block in enumerate(blocks):
        if isinstance(block, relax.DataflowBlock):
            head = [relax.VarBinding(v, bb.normalize(val)) for v, val in extra.items()]
            blocks[n] = relax.DataflowBlock(head + list(block.bindings), block.span)
            break
    return relax.SeqExpr(blocks, body.body, body.span)


def tile_fits(spec: TargetSpec) -> Callable[[int], bool]:
    """P -> whether the GEMM template tiles P output columns without padding (no padded copy of the
    input, epilogue fused at the tile). ResNet-50, AVX-512: 56x56 and 28x28 outputs qualify, 14x14 (196)
    and 7x7 (49) do not; padded (to 224 and 64 columns), their GEMMs ran 3-28% slower than the conv template
    in a per-shape A/B, while the 56x56 and 28x28 ones ran 10-38% faster."""
    params = cpu_params(spec)
    return lambda p: not choose_tile_width(p, params.nr(), params.lanes())[1]


def conv1x1_for_build(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], spec: TargetSpec,
                      func_name: str = "main"):
    """The build's hook: `conv1x1_as_matmul` for the output sizes `tile_fits` takes, unless
    EDGECC_CONV1X1_GEMM=0 (off; =all: every size)."""
    mode = os.environ.get("EDGECC_CONV1X1_GEMM", "1")
    if mode == "0":
        return mod, list(named_weights)
    columns_ok = (lambda p: True) if mode == "all" else tile_fits(spec)
    mod, named, _ = conv1x1_as_matmul(mod, named_weights, func_name, columns_ok)
    return mod, named
