"""Rebuild a Relax function after replacing some of its bindings: shared by the build-time weight rewrites.

`merge_linears` and `pack_gemv_weights` both swap single bindings for a few new ones (and weight
parameters for new ones); this is the part of that which has nothing to do with either rewrite.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


def replace_bindings(func: relax.Function, replace: dict) -> relax.SeqExpr:
    """`func`'s body with each dataflow binding whose var is a key of `replace` swapped for its list."""
    blocks = []
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            blocks.append(block)
            continue
        bindings = []
        for b in block.bindings:
            bindings += replace.get(b.var, [b])
        blocks.append(relax.DataflowBlock(bindings, block.span))
    return relax.SeqExpr(blocks, func.body.body, func.body.span)


def with_function(mod: tvm.IRModule, func_name: str, func: relax.Function, params: list,
                  body: relax.SeqExpr, bb: relax.BlockBuilder) -> tvm.IRModule:
    """A copy of `mod` whose `func_name` is `func` with new `params` and `body` (same attrs, purity, type)."""
    new_func = bb.normalize(relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span))
    out = tvm.IRModule(dict(mod.functions_items()))
    out[func_name] = new_func
    return out


def var_uses(func: relax.Function) -> dict:
    """Var -> how many times it occurs as an operand anywhere in the function body (a weight may be
    rewritten only where every use is the pattern)."""
    uses: dict = {}

    def _visit(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, _visit)
    return uses


def static_dims(ty) -> list[int] | None:
    """The dims of a tensor type when all are constants, else None (symbolic or unknown shape)."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = list(ty.shape.values)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def op_name(call) -> str:
    """The Relax op a call applies ("relax.nn.conv2d"), or "" for anything else (a call_tir, a var)."""
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else ""


def weight_params(func: relax.Function, named_weights: list, func_name: str) -> tuple[int, list]:
    """(num_input, the weight parameters) of a build function: its params after `num_input` are the weights,
    one per entry of `named_weights` (a mismatch is a bug in the build, not a user error)."""
    num_input = int(func.attrs["num_input"])
    wvars = list(func.params[num_input:])
    if len(wvars) != len(named_weights):
        raise RuntimeError(f"{len(named_weights)} weights for {len(wvars)} weight parameters of '{func_name}'")
    return num_input, wvars


def swap_weights(func: relax.Function, num_input: int, named_weights: list, new_vars: dict, transform) -> tuple:
    """(new params, new named weights): each weight parameter that is a key of `new_vars` becomes its new var,
    and its array `transform(old var, array)` (the layout the rewrite stores); the others stay as they are."""
    params = list(func.params[:num_input])
    named = []
    for v, (name, arr) in zip(func.params[num_input:], named_weights):
        if v in new_vars:
            params.append(new_vars[v])
            named.append((name, transform(v, arr)))
        else:
            params.append(v)
            named.append((name, arr))
    return params, named
