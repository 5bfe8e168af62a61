"""Quantize the block linears of an edgecc torch Llama (edgecc.models.llama) in place: RTN, GPTQ or AWQ.

Each linear's weight is replaced by exactly the dequantized `QuantizedTensor` the build would store for it
(same grid, same codes), so perplexity measured on the torch model is the algorithm's accuracy. AWQ folds
its input scales as AutoAWQ does for Llama: q/k/v's into `attn_norm.weight`, gate/up's into
`ffn_norm.weight`, down_proj's into up_proj's output rows; o_proj (its input is attention output of
grouped KV heads, no per-channel op in front) gets AWQ's clip search only. `lm_head` and the embedding stay
float (tied weights). Calibration: `calibration.llama_calibration` (statistics of the float model).
"""

from __future__ import annotations

import numpy as np

from edgecc.compress.calibration import Calibration, progress_track
from edgecc.compress.recipe import Recipe, load_recipe
from edgecc.compress.rtn import QuantizedTensor, quantize_rtn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _set(lin, qt_or_rows) -> None:
    import torch

    if isinstance(qt_or_rows, QuantizedTensor):
        rows = torch.from_numpy(qt_or_rows.dequantize().T.copy())
    else:
        rows = qt_or_rows
    with torch.no_grad():
        lin.weight.copy_(rows.to(lin.weight.dtype))


def _kn(lin) -> np.ndarray:
    return lin.weight.detach().numpy().T.astype(np.float32)


def quantize_llama(model, recipe: str | Recipe, method: str = "rtn", cal: Calibration | None = None,
                   act_order: bool = False) -> dict[str, dict]:
    """Quantize every block linear in place, from statistics of the float model (one pass); returns
    name -> {"scheme", "method", "packed_bytes"}."""
    recipe = load_recipe(recipe)
    if method != "rtn" and cal is None:
        raise ValueError(f"{method} needs a Calibration")
    report: dict[str, dict] = {}
    for i in progress_track(range(len(model.blocks)), f"{method} {recipe.name}", total=len(model.blocks)):
        _quantize_block(model.blocks[i], i, recipe, method, cal, act_order, report)
    return report


def quantize_llama_sequential(model, recipe: str | Recipe, method: str, chunks: list[np.ndarray],
                              act_order: bool = False) -> dict[str, dict]:
    """As `quantize_llama`, but block by block as GPTQ/AutoAWQ do: each block's calibration statistics are
    taken on the outputs of the blocks before it *after* those were quantized. `chunks`: int64 token chunks
    of one length (calibration.text_chunks)."""
    import torch

    from edgecc.compress.calibration import collect_torch

    recipe = load_recipe(recipe)
    n = len(chunks[0])
    mask = torch.full((n, n), float("-inf")).triu(1)
    cos, sin = model.rotary(torch.arange(n))
    report: dict[str, dict] = {}
    with torch.no_grad():
        xs = [model.embed(torch.from_numpy(np.asarray(c))[None]) for c in chunks]
        for i in progress_track(range(len(model.blocks)), f"{method} {recipe.name}", total=len(model.blocks)):
            blk = model.blocks[i]
            cal = None
            if method != "rtn":
                linears = {f"blocks.{i}.{ln}": getattr(blk, ln) for ln in LINEARS}
                cal = collect_torch(lambda x, b=blk: b(x, cos, sin, None, None, mask), xs, linears, quiet=True)
            _quantize_block(blk, i, recipe, method, cal, act_order, report)
            xs = [blk(x, cos, sin, None, None, mask)[0] for x in xs]
    return report


def _quantize_block(blk, i: int, recipe: Recipe, method: str, cal, act_order: bool, report: dict) -> None:
    import torch

    names = {ln: f"blocks.{i}.{ln}" for ln in LINEARS}
    schemes = {}
    for ln in LINEARS:
        lin = getattr(blk, ln)
        scheme, why = recipe.choose(names[ln] + ".weight", tuple(lin.weight.shape[::-1]))
        schemes[ln] = scheme
    if method in ("rtn", "gptq"):
        for ln in LINEARS:
            scheme = schemes[ln]
            if scheme is None:
                continue
            lin = getattr(blk, ln)
            if method == "rtn":
                qt = quantize_rtn(_kn(lin), scheme)
            else:
                from edgecc.compress.gptq import quantize_gptq

                qt = quantize_gptq(_kn(lin), cal.stats[names[ln]].hessian, scheme, act_order=act_order)
            _set(lin, qt)
            report[names[ln]] = {"scheme": scheme.name, "method": method, "packed_bytes": qt.nbytes}
        return
    if method != "awq":
        raise ValueError(f"unknown method {method}")
    from edgecc.compress.awq import quantize_scaled_rows, search_scale
    from edgecc.compress.grid import to_quantized

    def rows(ln):
        return getattr(blk, ln).weight.detach().to(torch.float64)

    groups = [(("q_proj", "k_proj", "v_proj"), "attn_norm"), (("gate_proj", "up_proj"), "ffn_norm"),
              (("down_proj",), "up_proj"), (("o_proj",), None)]
    hess = {}
    with torch.no_grad():
        for lns, prev in groups:
            st = cal.stats[names[lns[0]]]
            h = torch.from_numpy(st.hessian)
            scheme = schemes[lns[0]]
            if prev is None or scheme is None or any(schemes[ln] != scheme for ln in lns):
                for ln in lns:
                    hess[ln] = h
                continue
            s, _, _ = search_scale([rows(ln) for ln in lns], st.hessian, st.absmean, scheme)
            s = s.to(torch.float32).to(torch.float64)
            for ln in lns:  # weight columns (input channels) * s
                getattr(blk, ln).weight.mul_(s.to(torch.float32)[None, :])
                hess[ln] = h / s[:, None] / s[None, :]
            prev_mod = getattr(blk, prev)
            if prev == "up_proj":  # up_proj's output rows / s (feeds down_proj through silu(gate) * up)
                prev_mod.weight.div_(s.to(torch.float32)[:, None])
            else:  # RMSNorm weight / s
                prev_mod.weight.div_(s.to(torch.float32))
        for ln in LINEARS:  # after every fold (up_proj was rescaled by down_proj's s)
            scheme = schemes[ln]
            if scheme is None:
                continue
            lin = getattr(blk, ln)
            q, deq, scales, zeros = quantize_scaled_rows(rows(ln), torch.ones(lin.weight.shape[1],
                                                         dtype=torch.float64), hess[ln], scheme)
            qt = to_quantized(q, scales, zeros, scheme)
            _set(lin, qt)
            report[names[ln]] = {"scheme": scheme.name, "method": "awq", "packed_bytes": qt.nbytes}
