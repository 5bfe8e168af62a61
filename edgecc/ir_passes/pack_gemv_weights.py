"""Repack the weights of matrix-vector products at build time into column panels: one stream per task.

    y = x @ W          W: [K, N] row-major            ─▶    y = reshape(einsum("mk,pkj->mpj", x, Wp), [.., N])
    (x has at most `gemv_max_rows` rows)                    Wp: [N / nr, K, nr] = W's column panels

Why: a GEMV is a pass over the whole weight. The GEMV schedule (`schedules/contraction.py`) gives each task
`nr` adjacent columns; in W's own layout such a task reads `nr * 4` bytes from every row, one row every
`N * 4` bytes: a new 4 KiB page almost every row, hundreds of short streams the hardware prefetcher does
not follow (it stays inside a page). In panel layout each task reads one contiguous block of `K * nr`
elements. A decode step of a memory-bound decoder is almost only such GEMVs. The runtime-packing path of the
GEMM template cannot help here: packing at run time would copy the whole matrix on every call.

What is rewritten, in one function: `R.matmul(x, W)` where W is a 2-D float weight parameter (after
`num_input`) of x's dtype, x has a static shape with at most `gemv_max_rows` rows (the product of its leading
axes), and N has a panel width (`gemv_nr` lanes, or the widest whole number of half-vectors dividing N). An N
that is not a multiple of `gemv_nr` but close above one (at most `MAX_COLUMN_PAD` more) gets zero columns up to
it and full-width panels, and a `strided_slice` drops the extra outputs (`panel_layout`).
A weight is packed only when every use of it is such a GEMV, so no weight is ever stored twice; in
particular a weight shared with a prefill GEMM (LLM builds) stays as it is. The einsum's output
[M, N/nr, nr] is already W's column order, so the reshape back is a view; elementwise epilogues (bias,
activation, residual) follow in a small kernel of their own, because FuseOps does not fuse an einsum with
its consumers. The packing itself is done here, in numpy, on the build machine.

`EDGECC_PACK_GEMV=0` turns it off (for A/B timing).
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax

from edgecc.ir_passes.rebind import (replace_bindings, static_dims, swap_weights, var_uses, weight_params,
                                     with_function)
from edgecc.schedules.contraction import choose_tile_width, half_vector_width
from edgecc.schedules.params import CpuParams, cpu_params
from edgecc.targets.registry import TargetSpec


def panel_width(n: int, params: CpuParams, dtype_bits: int) -> int | None:
    """The panel width for an N-wide weight: the widest whole number of vectors up to the GEMV schedule's tile
    (`gemv_nr`) that divides N, else the widest whole number of half-vectors that does, so the schedule never
    pads a panel. Whole vectors first: with a half-vector width and a panel count that is a multiple of the
    vector (1000 = 100 x 10 on 4-lane NEON) the contraction analysis takes the panel index as vector axis and
    the GEMV template refuses the kernel (1000 = 125 x 8 instead)."""
    lanes = params.lanes(dtype_bits)
    width, needs_pad = choose_tile_width(n, params.gemv_nr(dtype_bits), lanes)
    if not needs_pad:
        return width
    return half_vector_width(n, params.gemv_nr(dtype_bits), lanes)


#: zero columns a GEMV weight may get (a share of its columns) to be cut into full-width panels
MAX_COLUMN_PAD = 1 / 16


def panel_layout(n: int, params: CpuParams, dtype_bits: int) -> tuple[int | None, int]:
    """(panel width, padded N): full `gemv_nr`-wide panels over N rounded up to a multiple of it, when that adds
    at most `MAX_COLUMN_PAD` of zero columns; else `panel_width(n)` over N itself. A classifier head of 1000
    columns (2048 x 1000, weights cold) ran in 0.56 / 0.32 ms (1 / 2 threads) as 1024 columns in 64-wide
    panels, 0.88 / 0.52 ms in 40-wide ones and 0.81 / 0.51 ms as 1008 in 48-wide ones (AVX-512)."""
    full = params.gemv_nr(dtype_bits)
    padded = -(-n // full) * full
    if n % full and padded > full and padded - n <= MAX_COLUMN_PAD * n:
        return full, padded
    return panel_width(n, params, dtype_bits), n


def pack_panels(w: np.ndarray, nr: int, n_padded: int | None = None) -> np.ndarray:
    """[K, N] -> [N / nr, K, nr] (column panel p holds columns p*nr .. p*nr+nr-1, row by row), after zero
    columns up to `n_padded`."""
    k, n = w.shape
    if n_padded and n_padded > n:
        w = np.concatenate([w, np.zeros((k, n_padded - n), w.dtype)], axis=1)
        n = n_padded
    return np.ascontiguousarray(w.reshape(k, n // nr, nr).transpose(1, 0, 2))


def _gemv_bindings(func: relax.Function, weights: set, max_rows: int) -> dict:
    """weight param -> [(binding var, x, K, N, M, x dims)] for every `R.matmul(x, W)` that is a GEMV on W."""
    found: dict = {}
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        for b in block.bindings:
            call = b.value if isinstance(b, relax.VarBinding) else None
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
                continue
            x, w = call.args
            if w not in weights:
                continue
            xd, wd = static_dims(x.ty), static_dims(w.ty)
            if xd is None or wd is None or len(wd) != 2 or len(xd) < 1 or xd[-1] != wd[0]:
                continue
            x_dtype, w_dtype = str(x.ty.dtype), str(w.ty.dtype)
            if x_dtype != w_dtype or not w_dtype.startswith("float"):
                continue
            out_dtype = call.attrs.out_dtype if call.attrs is not None else None
            if out_dtype is not None and str(out_dtype) not in ("", "void", w_dtype):
                continue
            m = int(np.prod(xd[:-1])) if len(xd) > 1 else 1
            if m > max_rows:
                continue
            found.setdefault(w, []).append((b.var, x, wd[0], wd[1], m, xd))
    return found


def pack_gemv_weights(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], spec: TargetSpec,
                      func_name: str = "main"):
    """-> (module, named weights, number of weights packed). See the module docstring."""
    func = mod[func_name]
    if spec.device != "cpu" or "num_input" not in (func.attrs or {}):
        return mod, list(named_weights), 0
    params = cpu_params(spec)
    num_input, wvars = weight_params(func, named_weights, func_name)
    uses = var_uses(func)
    candidates = _gemv_bindings(func, set(wvars), params.gemv_max_rows)
    packed: dict = {}  # old weight var -> (new var, panel width)
    for w, sites in candidates.items():
        if uses.get(w, 0) != len(sites):
            continue  # also read by something that is not a GEMV (a prefill GEMM, a transpose, ...)
        k, n = sites[0][2], sites[0][3]
        bits = tvm.runtime.DataType(str(w.ty.dtype)).bits
        nr, n_padded = panel_layout(n, params, bits)
        if nr is None or nr == n:
            continue  # one panel is the plain layout already
        packed[w] = (relax.Var(w.name + "_panels", relax.TensorType([n_padded // nr, k, nr], str(w.ty.dtype))),
                     nr, n_padded)
    if not packed:
        return mod, list(named_weights), 0

    bb = relax.BlockBuilder()
    replace: dict = {}
    for w, sites in candidates.items():
        if w not in packed:
            continue
        wp, nr, n_padded = packed[w]
        for var, x, k, n, m, xd in sites:
            dtype = str(x.ty.dtype)
            x2 = relax.DataflowVar(f"{var.name}_rows", relax.TensorType([m, k], dtype))
            h = relax.DataflowVar(f"{var.name}_panels", relax.TensorType([m, n_padded // nr, nr], dtype))
            bindings = [relax.VarBinding(x2, bb.normalize(relax.op.reshape(x, [m, k]))),
                        relax.VarBinding(h, bb.normalize(relax.op.einsum((x2, wp), "mk,pkj->mpj")))]
            if n_padded > n:  # the zero columns' outputs are dropped (a copy of M x N elements)
                wide = relax.DataflowVar(f"{var.name}_wide", relax.TensorType([m, n_padded], dtype))
                cut = relax.DataflowVar(f"{var.name}_cut", relax.TensorType([m, n], dtype))
                bindings += [relax.VarBinding(wide, bb.normalize(relax.op.reshape(h, [m, n_padded]))),
                             relax.VarBinding(cut, bb.normalize(relax.op.strided_slice(wide, axes=[1], begin=[0],
                                                                                       end=[n])))]
                h = cut
            bindings.append(relax.VarBinding(var, bb.normalize(relax.op.reshape(h, xd[:-1] + [n]))))
            replace[var] = bindings
    body = replace_bindings(func, replace)
    new_params, named = swap_weights(func, num_input, named_weights, {v: p[0] for v, p in packed.items()},
                                     lambda v, arr: pack_panels(arr, packed[v][1], packed[v][2]))
    return with_function(mod, func_name, func, new_params, body, bb), named, len(packed)


def pack_for_build(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], spec: TargetSpec,
                   func_name: str = "main"):
    """The build's hook (after compression and merging): `pack_gemv_weights` unless EDGECC_PACK_GEMV=0."""
    if os.environ.get("EDGECC_PACK_GEMV", "1") == "0":
        return mod, list(named_weights)
    mod, named, _ = pack_gemv_weights(mod, named_weights, spec, func_name)
    return mod, named
