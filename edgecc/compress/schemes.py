"""Quantization schemes: what a string like "w4g32-asym" means, and the attributes it becomes in the IR.

Grammar (case-insensitive)::

    w<bits>[g<group>][a8][-sym|-asym]

    w8          int8 weights, one scale per output channel, symmetric
    w8a8        w8, plus activations quantized to int8 per token (row) at run time
    w4g32a8     w4g32, plus activations quantized to int8 per token and per group of 32 at run time, so a
                decode GEMV runs on int8 dot products (like llama.cpp's Q4 x Q8 and onnxruntime's
                MatMulNBits accuracy level 4); the weights are stored exactly as for w4g32
    w4g32       4-bit weights, one scale per 32 consecutive input features per output channel, symmetric
    w4g128-asym 4-bit, groups of 128, a scale and an integer zero point per group
    w3g64       3-bit, groups of 64

`bits` is 2..8, the group size a multiple of 32 (or absent: per output channel). Quantization always runs
along the reduction (input-feature) axis of the weight, so a group is a run of `group_size` input features
of one output channel.

Storage (what the kernels read, see docs/compression.md):

* 8-bit: one byte per weight, `int8` (symmetric) or `uint8` (asymmetric), shape [K, N]
* 2..7-bit: a little-endian bitstream of codes along K, per output channel, in `uint32` words, shape
  [K * bits / 32, N]; groups are multiples of 32 codes, so a group is always a whole number of words and a
  3-bit code may straddle two words.
* codes are unsigned `q + 2^(bits-1)` for symmetric sub-byte schemes (the kernel subtracts the offset),
  signed int8 for w8; asymmetric codes are `round(w / s) + z` in [0, 2^bits - 1] with `uint8` zero points.
* scales: float32, shape [K / group, N] (per-channel: [1, N]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgecc.errors import EdgeccError

PER_CHANNEL = -1

_SCHEME_RE = re.compile(r"^w(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<act>a8)?(?:-(?P<sym>sym|asym))?$")


@dataclass(frozen=True)
class QuantScheme:
    """One weight quantization scheme (round-to-nearest or any other algorithm produces the same format)."""

    bits: int
    group_size: int = PER_CHANNEL  # PER_CHANNEL: one group spanning all input features
    symmetric: bool = True
    act_bits: int = 0  # 8: dynamic per-token int8 activations (w8a8); 0: activations stay float
    scale_dtype: str = "float32"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise EdgeccError(f"quantization to {self.bits} bits is not supported", "use 2..8 bits, e.g. w4g32")
        if self.group_size != PER_CHANNEL and (self.group_size <= 0 or self.group_size % 32):
            raise EdgeccError(f"group size {self.group_size} is not a multiple of 32",
                              "use g32, g64, g128, ... or no group (per output channel)")
        if self.act_bits not in (0, 8):
            raise EdgeccError(f"activation bits {self.act_bits} not supported", "only a8 (int8 per token)")
        if self.act_bits and not (self.bits == 8 and self.symmetric and self.group_size == PER_CHANNEL) \
                and not (self.bits == 4 and self.group_size != PER_CHANNEL):
            raise EdgeccError("int8 activations need int8 symmetric per-channel weights or 4-bit groups",
                              "use w8a8, or w4g32a8 / w4g32a8-asym")

    # -- naming -------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Canonical string: parse_scheme(s.name) == s."""
        out = f"w{self.bits}"
        if self.group_size != PER_CHANNEL:
            out += f"g{self.group_size}"
        if self.act_bits:
            out += f"a{self.act_bits}"
        if not self.symmetric:
            out += "-asym"
        return out

    def __str__(self) -> str:
        return self.name

    # -- storage ------------------------------------------------------------------------------------

    @property
    def storage_dtype(self) -> str:
        if self.bits == 8:
            return "int8" if self.symmetric else "uint8"
        return "uint32"

    @property
    def codes_per_word(self) -> float:
        """Codes per storage element (10.67 for 3-bit: codes straddle words)."""
        return 1.0 if self.bits == 8 else 32 / self.bits

    @property
    def dot_layout(self) -> bool:
        """w8a8 stores its codes in the int8 dot-product layout (`int8_dot.pack_k4`); 4-bit a8 schemes keep
        the ordinary 4-bit words, which the int4 dot kernel (`edgecc.schedules.int4_dot`) reads directly."""
        return self.act_bits == 8 and self.bits == 8

    @property
    def zero_offset(self) -> int:
        """What the kernel subtracts from a stored code of a symmetric scheme."""
        return 1 << (self.bits - 1) if (self.symmetric and self.bits < 8) else 0

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def check_shape(self, in_features: int, out_features: int) -> str | None:
        """Why a [in_features, out_features] weight cannot use this scheme, or None when it can."""
        g = self.group_for(in_features)
        if in_features % g:
            return f"{in_features} input features are not a multiple of the group size {g}"
        if self.bits < 8 and (g * self.bits) % 32:
            return f"a per-channel group of {g} {self.bits}-bit codes does not fill whole uint32 words"
        return None

    def storage_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of each stored tensor ("weight", "scales", and "zeros" when asymmetric)."""
        k, n = in_features, out_features
        groups = k // self.group_for(k)
        rows = k if self.bits == 8 else k * self.bits // 32
        out = {"weight": ((rows, n), self.storage_dtype), "scales": ((groups, n), self.scale_dtype)}
        if not self.symmetric:
            out["zeros"] = ((groups, n), "uint8")
        return out

    def stored_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The shapes params.bin holds and the kernels read: each [rows, N] tensor of `storage_shapes` cut
        into column tiles, tile-major: [N / T, rows, T] with T = `column_tile(N)`.

        Why: a GEMV reads one tile of columns for all rows; row-major, those rows lie N elements apart (a
        new page per row for a vocabulary-sized N, which defeats the hardware prefetcher); tile-major they
        are one contiguous block.
        """
        t = column_tile(out_features)
        out = {name: ((shape[1] // t, shape[0], t), dt)
               for name, (shape, dt) in self.storage_shapes(in_features, out_features).items()}
        if self.dot_layout:  # w8a8: 4 consecutive k of a column side by side (edgecc.schedules.int8_dot.pack_k4)
            out["weight"] = ((out_features // t, -(-in_features // 4), t * 4), "int8")
        return out

    def packed_nbytes(self, in_features: int, out_features: int) -> int:
        import numpy as np

        return int(sum(np.prod(shape) * np.dtype(dt).itemsize
                       for shape, dt in self.storage_shapes(in_features, out_features).values()))

    # -- IR attributes ------------------------------------------------------------------------------

    def to_attrs(self) -> dict:
        """The scheme part of the annotation dict (see edgecc.ir_passes.compression)."""
        return {
            "kind": "quant",
            "scheme": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": 0,  # reduction axis of the [in, out] weight: groups run along input features
            "symmetric": self.symmetric,
            "act_bits": self.act_bits,
            "storage": self.storage_dtype,
            "scale_dtype": self.scale_dtype,
            "zero_offset": self.zero_offset,
        }

    @staticmethod
    def from_attrs(attrs) -> "QuantScheme":
        return QuantScheme(bits=int(attrs["bits"]), group_size=int(attrs["group_size"]),
                           symmetric=bool(attrs["symmetric"]), act_bits=int(attrs["act_bits"]),
                           scale_dtype=str(attrs["scale_dtype"]))


def parse_scheme(text: str | QuantScheme) -> QuantScheme:
    """"w4g32-asym" -> QuantScheme(bits=4, group_size=32, symmetric=False)."""
    if isinstance(text, QuantScheme):
        return text
    s = str(text).strip().lower()
    m = _SCHEME_RE.match(s)
    if not m:
        raise EdgeccError(f"'{text}' is not a quantization scheme",
                          "write w<bits>[g<group>][a8][-asym], e.g. w8, w8a8, w4g32, w4g128-asym, w3g64")
    return QuantScheme(
        bits=int(m["bits"]),
        group_size=int(m["group"]) if m["group"] else PER_CHANNEL,
        symmetric=m["sym"] != "asym",
        act_bits=8 if m["act"] else 0,
    )


def is_scheme(text: str) -> bool:
    return bool(_SCHEME_RE.match(str(text).strip().lower()))


#: columns per storage tile of a quantized weight (a multiple of every target's vector register tile)
STORAGE_TILE = 64


def column_tile(out_features: int) -> int:
    """Tile width for `QuantScheme.stored_shapes`: STORAGE_TILE when it divides N, else N (one tile)."""
    return STORAGE_TILE if out_features % STORAGE_TILE == 0 else out_features


def tile_columns(a, tile: int):
    """[rows, N] -> [N / tile, rows, tile], contiguous (numpy)."""
    import numpy as np

    rows, n = a.shape
    return np.ascontiguousarray(a.reshape(rows, n // tile, tile).transpose(1, 0, 2))
