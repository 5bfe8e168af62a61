"""Quantize the block linears of an edgecc torch Llama (edgecc.models.llama) in place: RTN, GPTQ or AWQ.

Each linear goes through the build's own per-weight entry point (`quantize.quantize_one`, same defaults),
and its weight is replaced by exactly the dequantized `QuantizedTensor` the build would store for it (same
grid, same codes), so perplexity measured on the torch model is the build's accuracy. AWQ's input scale s,
which the build keeps as a multiply `x * (1/s)` in front of the quantized matmul, is applied as W_q / s (the
same product). `lm_head` and the embedding stay float (tied weights). Calibration:
`calibration.llama_calibration` (statistics of the float model).
"""

from __future__ import annotations

import numpy as np

from edgecc.compress.calibration import Calibration, progress_track
from edgecc.compress.recipe import Recipe, load_recipe

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _set(lin, rows) -> None:
    import torch

    with torch.no_grad():
        lin.weight.copy_(rows.to(lin.weight.dtype))


def _kn(lin) -> np.ndarray:
    return lin.weight.detach().numpy().T.astype(np.float32)


def quantize_llama(model, recipe: str | Recipe, method: str = "rtn", cal: Calibration | None = None) -> dict[str, dict]:
    """Quantize every block linear in place, from statistics of the float model (one pass); returns
    name -> {"scheme", "method", "packed_bytes"}."""
    recipe = load_recipe(recipe)
    if method != "rtn" and cal is None:
        raise ValueError(f"{method} needs a Calibration")
    report: dict[str, dict] = {}
    for i in progress_track(range(len(model.blocks)), f"{method} {recipe.name}", total=len(model.blocks)):
        _quantize_block(model.blocks[i], i, recipe, method, cal, report)
    return report


def quantize_llama_sequential(model, recipe: str | Recipe, method: str, chunks: list[np.ndarray]) -> dict[str, dict]:
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
            _quantize_block(blk, i, recipe, method, cal, report)
            xs = [blk(x, cos, sin, None, None, mask)[0] for x in xs]
    return report


def _quantize_block(blk, i: int, recipe: Recipe, method: str, cal, report: dict) -> None:
    import torch

    from edgecc.compress.quantize import quantize_one

    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"unknown method {method}")
    for ln in LINEARS:
        name = f"blocks.{i}.{ln}"
        lin = getattr(blk, ln)
        scheme, _why = recipe.choose(name + ".weight", tuple(lin.weight.shape[::-1]))
        if scheme is None:
            continue
        stats = None if method == "rtn" else cal.stats.get(name)
        qt, s, used = quantize_one(_kn(lin), scheme, method, stats, name)
        rows = torch.from_numpy(qt.dequantize().T.astype(np.float64))
        if s is not None:  # the build computes (x * (1/s)) @ W_q: the same product as x @ (W_q / s)
            rows = rows / torch.from_numpy(s.astype(np.float64))[None, :]
        _set(lin, rows)
        report[name] = {"scheme": scheme.name, "method": used, "packed_bytes": qt.nbytes}
