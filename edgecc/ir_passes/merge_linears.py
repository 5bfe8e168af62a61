"""Merge linears that read the same activation into one matmul over concatenated weights.

    q = x @ Wq;  k = x @ Wk;  v = x @ Wv          qkv = x @ [Wq | Wk | Wv]   (one kernel call)
                                          ─▶     q = qkv[..., 0:Nq];  k = qkv[..., Nq:Nq+Nk];  ...

Why: a decode step is hundreds of small, memory-bound kernel calls, and each call costs a thread-pool
launch on top of its memory traffic. Transformer layers have two such groups (q/k/v projections, the
gate/up pair of a gated MLP). In quantized builds (`edgecc.quantized_matmul` is opaque, so each is a call
of its own) that is 5 GEMVs -> 2 per layer, and small-N GEMVs (k/v: N 192) stop wasting threads. The slices
are `strided_slice` ops along the last axis; FuseOps fuses each into the kernel that consumes it (RoPE,
SiLU-multiply), except where the consumer is a pure layout change that used to be a free reshape view (V
before the KV-cache write): that one becomes a small copy kernel, so SmolLM2 saves 2 calls per layer.

What merges: in one dataflow block, calls with the same activation Var as first argument and weight
parameters (`main`'s params after `num_input`) as every other argument, either

* `R.matmul(x, W)` with W a 2-D float parameter [K, N_i] of x's dtype (no out_dtype change), or
* `edgecc.quantized_matmul(x, qweight, scales[, zeros])` whose annotations are identical except for the
  per-layer fields (same bits, group, symmetry, a8, storage, in_features): the packed tensors are
  concatenated along N (edgecc.compress.schemes: tile-major [N/T, rows, T], so whole column tiles append).

Never merged: different activations, different schemes, a float matmul with a quantized one, weights that
are not parameters, and weights something else reads too (they would then be stored twice). The weights are
concatenated here, at build time, in numpy (`merge_linears`), so the deployed module never repeats it; the
merged tensors replace their sources in the parameter list, so weight memory does not grow (layers sharing
one set of weights share one merged tensor). LLM builds merge prefill and decode alike; their merged
tensors are then equal and `edgecc.build_llm._share_weights` stores them once.

Builds merge quantized linears only (`BUILD_KINDS`, below); EDGECC_MERGE_LINEARS=0 turns merging off and
=all merges float weights too.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from edgecc.compress.schemes import STORAGE_TILE, QuantScheme, column_tile, tile_columns
from edgecc.ir_passes.rebind import replace_bindings, static_dims, weight_params, with_function
from edgecc.ir_passes.compression import LAYER_KEYS, QUANT_MATMUL, attrs_dict, quantized_matmul

#: what can merge: float matmuls over weight parameters, edgecc.quantized_matmul calls
KINDS = ("matmul", "quant")
#: what builds merge. Float weights are [K, N] row-major and the fp32 GEMV schedule reads them unpacked
#: (edgecc.schedules.contraction), so a wider N is a longer row stride (gate/up: 12 KiB, a multiple of
#: 4 KiB): merged, SmolLM2-135M fp32 decode got slower (1 thread, same tree: CPU time per step 42.2 -> 44.7
#: ms, gate+up 1343 -> 1434 us). Quantized weights are stored tile-major: merging appends whole tiles, each
#: GEMV still reads contiguous blocks, and w4 decode got faster.
BUILD_KINDS = ("quant",)
#: annotation fields that differ between merged layers (summed or joined in the merged call)
_PER_LAYER = set(LAYER_KEYS) | {"out_features"}


class _Linear:
    """One mergeable call: its binding var, activation, weight params and output width."""

    def __init__(self, var, x, weights, n, key, attrs=None):
        self.var, self.x, self.weights, self.n, self.key, self.attrs = var, x, weights, n, key, attrs


def _as_linear(binding, weight_index: dict) -> _Linear | None:
    if not isinstance(binding, relax.VarBinding):
        return None
    call = binding.value
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
        return None
    x, rest = call.args[0], list(call.args[1:])
    if not isinstance(x, relax.Var) or not rest or not all(isinstance(a, relax.Var) and a in weight_index
                                                            for a in rest):
        return None
    x_ty = x.ty
    if not isinstance(x_ty, relax.TensorType) or x_ty.ndim < 1:
        return None
    if call.op.name == "relax.matmul" and len(rest) == 1:
        out_dtype = call.attrs.out_dtype
        if out_dtype is not None and str(out_dtype) not in ("", "void", str(x_ty.dtype)):
            return None
        w_dims = static_dims(rest[0].ty)
        if w_dims is None or len(w_dims) != 2 or str(rest[0].ty.dtype) != str(x_ty.dtype):
            return None
        return _Linear(binding.var, x, rest, w_dims[1], ("matmul", str(x_ty.dtype), w_dims[0]))
    if call.op.name == QUANT_MATMUL:
        attrs = attrs_dict(call.attrs)
        scheme = tuple(sorted((k, repr(v)) for k, v in attrs.items() if k not in _PER_LAYER))
        # the packed tensors' own shapes (minus the N axis) must agree too, so the concatenation is exact
        dims = [static_dims(a.ty) for a in rest]
        if any(d is None or len(d) != 3 for d in dims):
            return None
        inner = tuple((tuple(d[1:2]), str(a.ty.dtype)) for d, a in zip(dims, rest))
        return _Linear(binding.var, x, rest, int(attrs["out_features"]),
                       ("quant", len(rest), scheme, inner), attrs)
    return None


def find_groups(func: relax.Function, kinds=KINDS) -> list[list[_Linear]]:
    """Groups (>= 2 calls, in program order) of mergeable linears of one dataflow block (module docstring);
    `kinds`: "matmul" (float weights) and/or "quant" (edgecc.quantized_matmul)."""
    num_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else None
    if num_input is None:
        return []
    weight_index = {v: i for i, v in enumerate(func.params[num_input:])}
    groups = []
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    for block in body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        by_key: dict = {}
        for binding in block.bindings:
            lin = _as_linear(binding, weight_index)
            if lin is not None and lin.key[0] in kinds:
                by_key.setdefault((lin.x, lin.key), []).append(lin)
        groups += [g for g in by_key.values() if len(g) >= 2]
    return groups


def _private_groups(func: relax.Function, groups: list[list[_Linear]]) -> list[list[_Linear]]:
    """The groups whose source weights nothing else reads (other code, or a group with other partners):
    merging those replaces the sources, so weight memory does not grow."""
    uses: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            for v in relax.analysis.free_vars(b.value):
                uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    in_groups: dict = {}
    for group in groups:
        sources = tuple(w for g in group for w in g.weights)
        for w in sources:
            in_groups.setdefault(w, set()).add(sources)
    counted: dict = {}
    for group in groups:
        for g in group:
            for w in set(g.weights):
                counted[w] = counted.get(w, 0) + 1
    return [group for group in groups
            if all(len(in_groups[w]) == 1 and counted[w] == uses.get(w, 0) for g in group for w in g.weights)]


# ------------------------------------------------------------------------------------ weight concatenation


def _untile(a: np.ndarray, dot_layout: bool) -> np.ndarray:
    """Stored tile-major tensor -> [rows, N] (or [K4, 4, N] for the w8a8 dot layout)."""
    tiles, rows, width = a.shape
    if dot_layout:  # [N/t, K4, t*4]: column c of a tile holds k = 4*k4 + j at [k4, 4c + j]
        t = width // 4
        return a.reshape(tiles, rows, t, 4).transpose(1, 3, 0, 2).reshape(rows, 4, tiles * t)
    return a.transpose(1, 0, 2).reshape(rows, tiles * width)


def _retile(a: np.ndarray, dot_layout: bool) -> np.ndarray:
    n = a.shape[-1]
    t = column_tile(n)
    if dot_layout:
        rows = a.shape[0]
        return np.ascontiguousarray(a.reshape(rows, 4, n // t, t).transpose(2, 0, 3, 1).reshape(n // t, rows, t * 4))
    return tile_columns(a, t)


def concat_packed(parts: list[np.ndarray], widths: list[int], dot_layout: bool) -> np.ndarray:
    """Tile-major packed tensors of N_i columns each -> one of sum(N_i) columns, same layout."""
    if all(n % STORAGE_TILE == 0 for n in widths):  # whole tiles of the same width: append them
        return np.ascontiguousarray(np.concatenate(parts, axis=0))
    return _retile(np.concatenate([_untile(p, dot_layout) for p in parts], axis=-1), dot_layout)


def _merged_weights(group: list[_Linear], arrays: list[np.ndarray]) -> list[np.ndarray]:
    if group[0].key[0] == "matmul":
        return [np.ascontiguousarray(np.concatenate(arrays, axis=1))]
    dot = QuantScheme.from_attrs(group[0].attrs).dot_layout
    widths = [g.n for g in group]
    per_arg = len(group[0].weights)
    out = []
    for j in range(per_arg):
        # only the codes of w8a8 use the dot layout; scales and zeros are plain tiles
        out.append(concat_packed([arrays[i * per_arg + j] for i in range(len(group))], widths, dot and j == 0))
    return out


# ------------------------------------------------------------------------------------ the rewrite


def _merged_annotation(group: list[_Linear]) -> dict:
    ann = {k: v for k, v in group[0].attrs.items()}
    ann["out_features"] = sum(g.n for g in group)
    ann["name"] = "+".join(str(g.attrs.get("name", "?")) for g in group)
    for key in ("orig_bytes", "packed_bytes"):
        if all(key in g.attrs for g in group):
            ann[key] = int(sum(int(g.attrs[key]) for g in group))
    return ann


def merge_linears(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], func_name: str = "main",
                  kinds=KINDS):
    """Merge every group in `mod[func_name]` (module docstring) -> (new module, new named weights, #groups).

    `named_weights` are the arrays of the function's weight parameters (after `num_input`), in order; the
    merged tensors take the place of each group's first weight, sources nothing else uses are dropped."""
    func = mod[func_name]
    groups = _private_groups(func, find_groups(func, kinds))
    if not groups:
        return mod, list(named_weights), 0
    num_input, wvars = weight_params(func, named_weights, func_name)
    index = {v: i for i, v in enumerate(wvars)}
    bb = relax.BlockBuilder()
    replace: dict = {}  # binding var -> new bindings emitted in its place
    new_weights: dict = {}  # first source param -> [(name, var, array)]
    by_sources: dict = {}  # source weights -> merged entries (layers sharing weights share the merge too)
    for gi, group in enumerate(groups):
        first = group[0].weights
        sources = tuple(w for g in group for w in g.weights)
        if sources not in by_sources:
            merged = _merged_weights(group, [named_weights[index[w]][1] for w in sources])
            names = [named_weights[index[w]][0] for w in first]
            entries = []
            for j, (name, arr) in enumerate(zip(names, merged)):
                mname = f"{name}.merged{len(group)}"
                var = relax.Var(mname.replace(".", "_").replace(":", "_"),
                                relax.TensorType(list(arr.shape), str(first[j].ty.dtype)))
                entries.append((mname, var, arr))
            by_sources[sources] = entries
            new_weights[first[0]] = entries
        entries = by_sources[sources]
        x = group[0].x
        mvars = [e[1] for e in entries]
        if group[0].key[0] == "matmul":
            call = relax.op.matmul(x, mvars[0])
        else:
            call = quantized_matmul(x, mvars[0], mvars[1], mvars[2] if len(mvars) > 2 else None,
                                    _merged_annotation(group))
        call = bb.normalize(call)
        out = relax.DataflowVar(f"merged_linear{gi}", call.ty)
        axis = x.ty.ndim - 1
        offset = 0
        slices = []
        for g in group:
            sl = bb.normalize(relax.op.strided_slice(out, [axis], [offset], [offset + g.n], assume_inbound=True))
            slices.append(relax.VarBinding(g.var, sl))
            offset += g.n
        replace[group[0].var] = [relax.VarBinding(out, call), slices[0]]
        for g, b in zip(group[1:], slices[1:]):
            replace[g.var] = [b]
    body = replace_bindings(func, replace)
    still_used = set(relax.analysis.free_vars(body))
    params = list(func.params[:num_input])
    named = []
    for v, (name, arr) in zip(wvars, named_weights):
        if v in still_used:
            params.append(v)
            named.append((name, arr))
        for mname, mvar, marr in new_weights.get(v, []):
            params.append(mvar)
            named.append((mname, marr))
    return with_function(mod, func_name, func, params, body, bb), named, len(groups)


def merge_for_build(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], func_name: str = "main"):
    """The build's hook (after compression): `merge_linears` of BUILD_KINDS; EDGECC_MERGE_LINEARS=0 turns it
    off, =all merges float weights too (A/B timing)."""
    import os

    mode = os.environ.get("EDGECC_MERGE_LINEARS", "1")
    if mode == "0":
        return mod, list(named_weights)
    if mode == "all":
        return merge_linears(mod, named_weights, func_name)[:2]
    mod, named, _ = merge_linears(mod, named_weights, func_name, BUILD_KINDS)
    return mod, named
