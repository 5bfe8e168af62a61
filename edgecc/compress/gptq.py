"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, spreading each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

For a layer y = x W (W [K, N], our storage layout) and calibration inputs X [M, K], the output error of a
quantized W_q is ||X W - X W_q||^2 = tr(dW^T H dW) / 2 with H = 2 X^T X. GPTQ walks the K input features
(rows of W; the columns of nn.Linear's [N, K] weight, the layout used below), rounds one onto the grid and
updates the rest with the Cholesky factor of H^-1 ("lazy batch" blocks of 128 columns; Frantar et al. Alg. 1).

Grid: per-group scales and zeros of rtn.py's form (symmetric max-abs or asymmetric min/max over a group of G
input features, optionally range-clipped), so the result is a `QuantizedTensor` in rtn.py's storage and runs
on the same kernels. With `act_order=False` a group's scales come from the *updated* weights when its first
column is reached.

`act_order=True` (the default, GPTQ's "desc_act" with static groups) quantizes the columns in order of
decreasing Hessian diagonal; the groups keep their natural (storage) order and their scales are fixed
beforehand from the original weights, because our storage has no per-column group index. It matters a lot
on LLMs, whose few huge-activation input channels must be rounded first, while every other column can still
absorb their error. With a static grid, `clip=True` (the default) sets each group's range by AWQ's clip search
(awq.search_clip: the shrink ratio, 1 .. 0.5, with the lowest output error on the group's diagonal block of
H) instead of max-abs. On SmolLM2-135M w4g128 (benchmarks/bench_accuracy.py, choices made on a held-out
text, not the evaluation text) plain-order GPTQ did not beat RTN's perplexity although its per-layer error
was 2-5x lower; act-order cut RTN's increase by 30%, act-order with clipped scales by about 75%.

The column loop is hundreds of tiny torch ops per layer: it runs with one intra-op thread (with more, thread
hand-offs dominate, 20x slower on a loaded 2-core machine).
"""

from __future__ import annotations

import numpy as np

from edgecc.compress.grid import check_weight, grid_params, round_to_grid, to_quantized
from edgecc.compress.rtn import QuantizedTensor
from edgecc.compress.schemes import QuantScheme, parse_scheme


def gptq_rows(w, hessian, scheme: QuantScheme, damp: float = 0.01, block: int = 128, act_order: bool = True,
              clip: bool = True):
    """GPTQ on torch rows w [N, K] with H [K, K] (any positive multiple of X^T X).

    Returns (q [N, K] integer values, dequantized [N, K], scales [N, K/G], zeros [N, K/G] or None).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq_rows(w, hessian, scheme, damp, block, act_order, clip)
    finally:
        torch.set_num_threads(threads)


def _gptq_rows(w, hessian, scheme: QuantScheme, damp: float, block: int, act_order: bool, clip: bool):
    import torch

    w = w.detach().to(torch.float64).clone()
    n, k = w.shape
    g = scheme.group_for(k)
    h = torch.as_tensor(np.asarray(hessian), dtype=torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = k // g
    scales = torch.ones((n, n_groups), dtype=torch.float64)
    zeros = None if scheme.symmetric else torch.zeros((n, n_groups), dtype=torch.float64)
    static = act_order or g == k  # per-channel: one grid over all of K, from the original weights
    if static:
        ratios = None
        if clip:
            from edgecc.compress.awq import search_clip

            ratios = search_clip(w, h, scheme)
        for j in range(n_groups):
            s, z = grid_params(w[:, j * g:(j + 1) * g], scheme, None if ratios is None else ratios[:, j])
            scales[:, j] = s
            if zeros is not None:
                zeros[:, j] = z

    perm = torch.arange(k)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    invperm = torch.argsort(perm)

    mean_diag = torch.mean(torch.diag(h))
    h += torch.eye(k, dtype=torch.float64) * (damp * mean_diag)
    for attempt in range(5):  # more damping if H is numerically singular
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            hinv = torch.linalg.cholesky(hinv, upper=True)
            break
        except RuntimeError:
            h += torch.eye(k, dtype=torch.float64) * (damp * mean_diag * 10 ** (attempt + 1))
    else:  # pragma: no cover - a Hessian that stays singular: plain RTN
        hinv = torch.eye(k, dtype=torch.float64)

    block = max(block // g * g, g) if not static else block  # a dynamic group never straddles two blocks
    q_all = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and col % g == 0:  # first column of a group: its grid from the updated weights
                s, z = grid_params(w1[:, i:i + g], scheme)
                scales[:, grp] = s
                if zeros is not None:
                    zeros[:, grp] = z
            s = scales[:, grp]
            z = None if zeros is None else zeros[:, grp]
            q, d = round_to_grid(w1[:, i:i + 1], s, z, scheme)
            q_all[:, i1 + i] = q[:, 0]
            deq[:, i1 + i] = d[:, 0]
            e = (w1[:, i] - d[:, 0]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all[:, invperm], deq[:, invperm], scales, zeros


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, scheme: QuantScheme | str, damp: float = 0.01,
                  block: int = 128, act_order: bool = True, clip: bool = True) -> QuantizedTensor:
    """GPTQ of a float weight [K, N] (our storage layout) given H = X^T X [K, K] of its calibration inputs."""
    import torch

    scheme = parse_scheme(scheme)
    check_weight(w, scheme)
    q, _, scales, zeros = gptq_rows(torch.from_numpy(np.ascontiguousarray(w.T)), hessian, scheme, damp, block,
                                    act_order, clip)
    return to_quantized(q, scales, zeros, scheme, str(w.dtype))
