"""SmoothQuant (Xiao et al., 2023) for w8a8: move activation outliers into the weights before quantizing.

With dynamic per-token int8 activations, a few input channels with huge activations set every token's
scale and crush the rest. SmoothQuant divides input channel k by

    s_k = max|x_k|^alpha / max|w_k|^(1 - alpha)          (alpha = 0.5; w_k = row k of the [K, N] weight)

and multiplies row k of the weight by s_k: (X diag(s)^-1)(diag(s) W) = X W exactly in real arithmetic, and
both factors are now easier to quantize. The smoothed weight is then quantized like any other (RTN or GPTQ,
w8a8 storage). In a torch Llama the 1/s goes into the preceding RMSNorm weight; in an ONNX build it stays an
input-side multiply `x * (1/s)` in front of the quantized matmul.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.5


def smooth_scales(act_absmax: np.ndarray, w: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Per-input-channel s [K] (float32) for a weight [K, N] (or several concatenated along N)."""
    a = np.maximum(np.asarray(act_absmax, np.float64), 1e-5)
    wmax = np.maximum(np.abs(np.asarray(w, np.float64)).max(axis=1), 1e-5)
    s = a ** alpha / wmax ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return s.astype(np.float32)


def smooth_weight(w: np.ndarray, act_absmax: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(diag(s) W as float32 [K, N], s [K]): the layer then computes (x / s) @ (diag(s) W)."""
    s = smooth_scales(act_absmax, w, alpha)
    return (np.asarray(w, np.float64) * s[:, None].astype(np.float64)).astype(np.float32), s
