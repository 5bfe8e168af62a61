"""Round-to-nearest (RTN) weight quantization and bit packing, in numpy.

`quantize_rtn(w, scheme)` takes a float weight laid out [in_features K, out_features N] (the right operand
of `x @ W`) and returns a `QuantizedTensor`: the packed storage the kernels read, the scales and zero points.
`QuantizedTensor.dequantize()` is the exact reference (float64) the compiled kernels must reproduce:

    W[k, n] = (code[k, n] - zero[k // G, n]) * scale[k // G, n]

with zero = 2^(bits-1) for symmetric sub-byte schemes, 0 for w8, and the stored uint8 for asymmetric ones.
GPTQ/AWQ would produce the same `QuantizedTensor` with better-chosen codes and scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecc.compress.schemes import QuantScheme, parse_scheme
from edgecc.errors import EdgeccError


# ------------------------------------------------------------------------------------------ packing


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [K, N] (< 2^bits) -> uint32 [K * bits / 32, N]: a little-endian bitstream along K.

    Code k of a column starts at bit k*bits of that column's stream; bit b of the stream is bit b % 32 of
    word b // 32. Codes may straddle two words (3, 5, 6, 7 bits).
    """
    k, n = codes.shape
    if (k * bits) % 32:
        raise ValueError(f"{k} codes of {bits} bits do not fill whole uint32 words")
    codes = codes.astype(np.uint64)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code out of range for {bits} bits")
    words = np.zeros((k * bits // 32, n), np.uint64)
    pos = np.arange(k) * bits
    idx, shift = pos // 32, (pos % 32).astype(np.uint64)
    np.bitwise_or.at(words, idx, (codes << shift[:, None]) & np.uint64(0xFFFFFFFF))
    over = shift + np.uint64(bits) > np.uint64(32)
    if over.any():
        rows = np.nonzero(over)[0]
        np.bitwise_or.at(words, idx[rows] + 1, codes[rows] >> (np.uint64(32) - shift[rows, None]))
    return words.astype(np.uint32)


def unpack_bits(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint32 [K * bits / 32, N] -> int64 codes [K, N]."""
    w = words.astype(np.uint64)
    # append a zero row so a straddling code can read "the next word" at the end without a branch
    w = np.concatenate([w, np.zeros((1, w.shape[1]), np.uint64)])
    pos = np.arange(k) * bits
    idx, shift = pos // 32, (pos % 32).astype(np.uint64)
    both = w[idx] | (w[idx + 1] << np.uint64(32))
    return ((both >> shift[:, None]) & np.uint64((1 << bits) - 1)).astype(np.int64)


# ------------------------------------------------------------------------------------------ tensors


@dataclass
class QuantizedTensor:
    """A quantized [K, N] weight in the exact form the kernels read."""

    scheme: QuantScheme
    weight: np.ndarray  # storage: int8/uint8 [K, N] or uint32 [K*bits/32, N]
    scales: np.ndarray  # float32 [K/G, N]
    zeros: np.ndarray | None  # uint8 [K/G, N] (asymmetric only)
    shape: tuple[int, int]  # (K, N) of the float weight
    dtype: str = "float32"

    @property
    def group(self) -> int:
        return self.scheme.group_for(self.shape[0])

    def codes(self) -> np.ndarray:
        """Stored codes as int64 [K, N] (signed for w8, unsigned otherwise)."""
        k, _ = self.shape
        if self.scheme.bits == 8:
            return self.weight.astype(np.int64)
        return unpack_bits(self.weight, self.scheme.bits, k)

    def zero_points(self) -> np.ndarray:
        """Per-group zero point as int64 [K/G, N]."""
        if self.zeros is not None:
            return self.zeros.astype(np.int64)
        return np.full(self.scales.shape, self.scheme.zero_offset, np.int64)

    def dequantize(self) -> np.ndarray:
        """The float64 weight [K, N] the kernels compute with (exactly; no rounding beyond float64)."""
        g = self.group
        q = self.codes() - np.repeat(self.zero_points(), g, axis=0)
        return q.astype(np.float64) * np.repeat(self.scales.astype(np.float64), g, axis=0)

    def tensors(self) -> dict[str, np.ndarray]:
        """The stored tensors, in the kernels' tile-major layout (`QuantScheme.stored_shapes`)."""
        from edgecc.compress.schemes import column_tile, tile_columns

        t = column_tile(self.shape[1])
        if self.scheme.dot_layout:  # w8a8: the int8 dot-product layout
            from edgecc.schedules.int8_dot import pack_k4

            weight = pack_k4(self.weight, t)
        else:
            weight = tile_columns(self.weight, t)
        out = {"weight": weight, "scales": tile_columns(self.scales, t)}
        if self.zeros is not None:
            out["zeros"] = tile_columns(self.zeros, t)
        return out

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors().values()))

    @property
    def original_nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def quantize_rtn(w: np.ndarray, scheme: QuantScheme | str) -> QuantizedTensor:
    """Round-to-nearest quantization of a float weight [K, N] along K (see module docstring)."""
    scheme = parse_scheme(scheme)
    if w.ndim != 2:
        raise EdgeccError(f"can only quantize 2-D weights, got shape {list(w.shape)}")
    k, n = w.shape
    why = scheme.check_shape(k, n)
    if why:
        raise EdgeccError(f"cannot quantize a [{k}, {n}] weight with {scheme.name}: {why}")
    g = scheme.group_for(k)
    wg = w.astype(np.float64).reshape(k // g, g, n)  # [groups, G, N]
    bits = scheme.bits
    if scheme.symmetric:
        qmax = (1 << (bits - 1)) - 1  # symmetric range [-qmax, qmax]; the code -2^(bits-1) stays unused
        amax = np.abs(wg).max(axis=1)
        scales = (amax / qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(wg / scales[:, None, :].astype(np.float64)), -qmax, qmax).astype(np.int64)
        zeros = None
        codes = q + scheme.zero_offset
    else:
        qmax = (1 << bits) - 1
        lo = np.minimum(wg.min(axis=1), 0.0)  # keep 0.0 exactly representable
        hi = np.maximum(wg.max(axis=1), 0.0)
        scales = ((hi - lo) / qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        s64 = scales.astype(np.float64)
        zeros = np.clip(np.rint(-lo / s64), 0, qmax).astype(np.uint8)
        codes = np.clip(np.rint(wg / s64[:, None, :]) + zeros[:, None, :], 0, qmax).astype(np.int64)
    codes = codes.reshape(k, n)
    if bits == 8:
        storage = codes.astype(np.int8 if scheme.symmetric else np.uint8)
    else:
        storage = pack_bits(codes, bits)
    return QuantizedTensor(scheme, storage, np.ascontiguousarray(scales), zeros, (k, n), str(w.dtype))
