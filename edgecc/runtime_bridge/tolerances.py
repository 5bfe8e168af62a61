"""Numerical tolerances for comparing edgecc's outputs with onnxruntime's, kept in one place.

An output passes when its cosine similarity with the reference is at least `min_cosine` AND its max
absolute error is within `atol + rtol * max|reference|`. The relative term scales with the output's
magnitude (a logit of 40 and a probability of 0.01 cannot share an absolute bound); the cosine catches
wrong-but-small outputs. fp32 bounds allow for a different summation order (blocked matmuls, fused
kernels) over deep networks; integer outputs must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-9, rtol=1e-9, min_cosine=0.999999),
    "float32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
    "float16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.99),
}
# Integer/bool outputs: atol = rtol = 0 already demands equality; the cosine bound only allows for the
# float64 rounding of the cosine itself (1.0 exactly failed equal int outputs with cosine 0.9999999999999998).
EXACT = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0 - 1e-9)


def tolerance_for(dtype: str) -> Tolerance:
    return TOLERANCES.get(dtype, EXACT)
