"""edgecc's own ONNX converters: ops TVM's importer lacks or gets wrong.

A converter is a function `(bb, inputs, attrs, params, opset) -> relax.Expr | relax.Tuple`, registered for
an `(op_type, domain)` with `@register`; it may return `NotImplemented` to hand the node back to TVM's
converter (e.g. `Shape` of a tensor without a static shape). `edgecc.frontend.importer` consults this
registry before TVM's converter map, and `op_support` counts these ops as supported. The arguments are
those of TVM's converters (`params` = [graph nodes, params]), plus the model's default-domain opset.

Modules: `standard.py` (default-domain ops: Shape, Constant, LayerNormalization with Mean/InvStdDev,
RMSNormalization, the loss ops, EyeLike, OneHot, Swish/SwiGLU/Celu, LpNormalization, CumProd,
ReverseSequence, BitCast, CenterCropPad, TensorScatter, Dropout's mask, mixed-type Pow, bool/float ReduceMax/Min,
IsInf's detect flags, float Mod, the window functions), `resize.py` (Resize and Upsample, every mode),
`attention.py` (standard Attention and RotaryEmbedding; com.microsoft RotaryEmbedding, MultiHeadAttention,
GroupQueryAttention), `float8.py` (Cast/CastLike to and from the float8 types), `subbyte.py` (Cast, CastLike,
QuantizeLinear, DequantizeLinear on int4/uint4/int2/uint2/float4e2m1 held one element per byte; called by the
importer for nodes that touch such values rather than looked up here), `quantized.py`
(QuantizeLinear/DequantizeLinear per-tensor, per-axis and blocked, QLinearMatMul, QLinearConv, ConvInteger),
`contrib.py` (com.microsoft: MatMulNBits, GatherBlockQuantized, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization).
TVM's own converters are used (and tested in tests/test_converters.py) for DynamicQuantizeLinear,
MatMulInteger, FastGelu, BiasGelu and SkipLayerNormalization.

`set_enabled(False)` turns the registry off, leaving TVM's importer alone (`edgecc validate
--no-converters` uses it to measure what these converters add).
"""

from __future__ import annotations

from typing import Callable

Converter = Callable[..., object]

#: Name of the string attribute the importer adds to nodes outside the default domain, so that a converter
#: lookup can tell `com.microsoft::RotaryEmbedding` from the standard one (TVM's converters see no domain).
DOMAIN_ATTR = "__edgecc_domain"

_REGISTRY: dict[tuple[str, str], Converter] = {}
_state = {"enabled": True, "loaded": False}


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register(op_type: str, domain: str = "", *more_domains: str):
    """Decorator: register a converter for op_type in one or more domains."""

    def deco(fn: Converter) -> Converter:
        for d in (domain, *more_domains):
            _REGISTRY[(_norm_domain(d), op_type)] = fn
        return fn

    return deco


def _load() -> None:
    if not _state["loaded"]:
        _state["loaded"] = True
        from edgecc.frontend.converters import (  # noqa: F401 - registers
            attention, contrib, float8, quantized, resize, standard)


def set_enabled(enabled: bool) -> None:
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    return _state["enabled"]


def lookup(op_type: str, domain: str = "") -> Converter | None:
    if not _state["enabled"]:
        return None
    _load()
    return _REGISTRY.get((_norm_domain(domain), op_type))


def op_types() -> set[str]:
    """Op types (any domain) edgecc converts itself (empty when disabled)."""
    if not _state["enabled"]:
        return set()
    _load()
    return {op for _, op in _REGISTRY}
