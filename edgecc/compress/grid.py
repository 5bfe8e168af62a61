"""The quantization grid shared by RTN, GPTQ and AWQ, in torch: per-group scales/zeros exactly as `rtn.py`
computes them, rounding onto a given grid, and packing integer codes into a `QuantizedTensor`.

Every algorithm here ends in the same storage `quantize_rtn` produces (codes, float32 scales, uint8 zeros in
rtn.py's layout), so the same kernels run the result: an algorithm only chooses *which* codes and scales.

Layout note: the functions take weights as torch [N_out, K_in] rows (nn.Linear's layout, the one GPTQ is
written in); `to_quantized` turns codes back into the [K, N] storage of the Relax matmul's right operand.
"""

from __future__ import annotations

import numpy as np

from edgecc.compress.rtn import QuantizedTensor, pack_bits
from edgecc.compress.schemes import QuantScheme


def _torch():
    import torch

    return torch


def qrange(scheme: QuantScheme) -> tuple[int, int]:
    """(lowest, highest) integer value before the code offset: symmetric [-qmax, qmax], asymmetric [0, 2^b-1]."""
    if scheme.symmetric:
        qmax = (1 << (scheme.bits - 1)) - 1
        return -qmax, qmax
    return 0, (1 << scheme.bits) - 1


def grid_params(w, scheme: QuantScheme, clip=None):
    """Scales (float32-rounded, as float64) and zero points for a block of rows.

    w: float [N, G] (one group of G input features, every output row); clip: optional [N] ratio in (0, 1] that
    shrinks the range (AWQ's clip search). Returns (scale [N] float64, zero [N] float64 or None): rtn.py's rule.
    """
    torch = _torch()
    w = w.to(torch.float64)
    if scheme.symmetric:
        qmax = (1 << (scheme.bits - 1)) - 1
        amax = w.abs().amax(dim=1)
        if clip is not None:
            amax = amax * clip
        scale = (amax / qmax).to(torch.float32)
        scale[scale == 0] = 1.0
        return scale.to(torch.float64), None
    qmax = (1 << scheme.bits) - 1
    lo = torch.clamp(w.amin(dim=1), max=0.0)
    hi = torch.clamp(w.amax(dim=1), min=0.0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / qmax).to(torch.float32)
    scale[scale == 0] = 1.0
    scale = scale.to(torch.float64)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def round_to_grid(w, scale, zero, scheme: QuantScheme):
    """w [N, C] onto the grid of per-row scale/zero [N] -> (integer values q [N, C], dequantized [N, C]).

    q is what rtn.py stores before the code offset: symmetric q in [-qmax, qmax], asymmetric the code itself.
    """
    torch = _torch()
    w = w.to(torch.float64)
    lo, hi = qrange(scheme)
    s = scale[:, None]
    if zero is None:
        q = torch.clamp(torch.round(w / s), lo, hi)
        return q, q * s
    z = zero[:, None]
    q = torch.clamp(torch.round(w / s) + z, lo, hi)
    return q, (q - z) * s


def rtn_rows(w, scheme: QuantScheme, clip=None):
    """Round-to-nearest of rows w [N, K] group by group (rtn.py's result, in torch) ->
    (q [N, K], dequantized [N, K], scales [N, K/G], zeros [N, K/G] or None)."""
    torch = _torch()
    n, k = w.shape
    g = scheme.group_for(k)
    qs, deq, scales, zeros = [], [], [], []
    for j in range(0, k, g):
        c = None if clip is None else clip[:, j // g]
        s, z = grid_params(w[:, j:j + g], scheme, c)
        q, d = round_to_grid(w[:, j:j + g], s, z, scheme)
        qs.append(q)
        deq.append(d)
        scales.append(s)
        zeros.append(z)
    return (torch.cat(qs, 1), torch.cat(deq, 1), torch.stack(scales, 1),
            None if zeros[0] is None else torch.stack(zeros, 1))


def to_quantized(q, scales, zeros, scheme: QuantScheme, dtype: str = "float32") -> QuantizedTensor:
    """Integer values q [N, K] (from `round_to_grid`), scales/zeros [N, K/G] -> rtn.py's QuantizedTensor of
    the [K, N] weight (codes offset and bit-packed exactly like `quantize_rtn`)."""
    q = q.detach().cpu().numpy().astype(np.int64).T  # [K, N]
    k, n = q.shape
    codes = q + scheme.zero_offset if scheme.symmetric else q
    if scheme.bits == 8:
        storage = codes.astype(np.int8 if scheme.symmetric else np.uint8)
    else:
        storage = pack_bits(codes, scheme.bits)
    sc = np.ascontiguousarray(scales.detach().cpu().numpy().T.astype(np.float32))
    zp = None if zeros is None else np.ascontiguousarray(zeros.detach().cpu().numpy().T.astype(np.uint8))
    return QuantizedTensor(scheme, storage, sc, zp, (k, n), dtype)


def check_weight(w: np.ndarray, scheme: QuantScheme) -> None:
    from edgecc.errors import EdgeccError

    if w.ndim != 2:
        raise EdgeccError(f"can only quantize 2-D weights, got shape {list(w.shape)}")
    why = scheme.check_shape(*w.shape)
    if why:
        raise EdgeccError(f"cannot quantize a [{w.shape[0]}, {w.shape[1]}] weight with {scheme.name}: {why}")


def output_error(w_kn: np.ndarray, deq_kn: np.ndarray, hessian: np.ndarray) -> float:
    """sum over calibration rows of ||x W - x W_q||^2, from H = X^T X: tr(dW^T H dW)."""
    d = np.asarray(w_kn, np.float64) - np.asarray(deq_kn, np.float64)
    return float(np.einsum("kn,kj,jn->", d, np.asarray(hessian, np.float64), d))
