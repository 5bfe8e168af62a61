"""Which scheme each layer gets: a default scheme, per-layer globs, and the layers left in float.

`--quantize` takes either a scheme (`w4g32`: every eligible layer) or a recipe file (JSON, or TOML):

    {
      "default": "w4g32",            # scheme for layers no rule names ("none": keep float)
      "min_params": 4096,            # layers with fewer weights stay float (default 4096)
      "layers": {                    # first matching glob wins (fnmatch on the weight's initializer name
                                     # or on its node's name, e.g. "/layers.0/attn/q_proj/MatMul")
        "*lm_head*": "w8",
        "*.self_attn.*": "w4g128-asym",
        "*embed*": "none"
      }
    }

Embedding tables (Gather with a constant table, axis 0) are layers too: `*embed*` / `*wte*` globs select
them (the scheme's a8 part does not apply to a lookup).

A layer whose shape does not fit its scheme (input features not a multiple of the group) falls back to the
`fallback` scheme when one is given (default: w8, which fits every shape) and is reported.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgecc.compress.schemes import QuantScheme, is_scheme, parse_scheme
from edgecc.errors import EdgeccError

DEFAULT_MIN_PARAMS = 4096
_NONE = ("none", "fp32", "float", "skip")


def _scheme_or_none(value) -> QuantScheme | None:
    if value is None or str(value).strip().lower() in _NONE:
        return None
    return parse_scheme(str(value))


@dataclass
class Recipe:
    default: QuantScheme | None
    layers: list[tuple[str, QuantScheme | None]] = field(default_factory=list)
    min_params: int = DEFAULT_MIN_PARAMS
    fallback: QuantScheme | None = field(default_factory=lambda: parse_scheme("w8"))
    source: str = ""  # the scheme string or file it came from

    @property
    def name(self) -> str:
        return self.source or (self.default.name if self.default else "none")

    def choose(self, name: str, shape: tuple[int, int],
               aliases: tuple[str, ...] = ()) -> tuple[QuantScheme | None, str]:
        """(scheme or None, why) for weight `name` of shape [in_features, out_features]; a glob may match
        `name` or one of its `aliases` (the ONNX initializer name when `name` is its node's name)."""
        k, n = shape
        scheme, why = self.default, "default"
        for pattern, sch in self.layers:
            if any(fnmatch.fnmatchcase(alias, pattern) for alias in (name, *aliases)):
                scheme, why = sch, f"rule {pattern}"
                break
        if scheme is None:
            return None, f"kept float ({why})"
        if why == "default" and k * n < self.min_params:
            return None, f"kept float (tiny: {k * n} < min_params {self.min_params})"
        bad = scheme.check_shape(k, n)
        if bad:
            if self.fallback is not None and not self.fallback.check_shape(k, n):
                return self.fallback, f"fallback {self.fallback.name} ({scheme.name}: {bad})"
            return None, f"kept float ({scheme.name}: {bad})"
        return scheme, why


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    """A scheme string ("w4g32") or the path of a JSON/TOML recipe file."""
    if isinstance(spec, Recipe):
        return spec
    text = str(spec)
    if is_scheme(text):
        return Recipe(default=parse_scheme(text), source=parse_scheme(text).name)
    path = Path(text)
    if not path.is_file():
        raise EdgeccError(f"--quantize '{text}' is neither a scheme nor a recipe file",
                          "give a scheme (w8, w8a8, w4g32, w4g128-asym, w3g64) or a .json/.toml recipe")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's
        raise EdgeccError(f"cannot read recipe {path}: {exc}", "fix the file's syntax") from exc
    if not isinstance(data, dict):
        raise EdgeccError(f"recipe {path} is not a table/object", 'write {"default": "w4g32", "layers": {...}}')
    unknown = set(data) - {"default", "layers", "min_params", "fallback"}
    if unknown:
        raise EdgeccError(f"recipe {path} has unknown keys {sorted(unknown)}",
                          "use default, layers, min_params, fallback")
    layers = [(str(k), _scheme_or_none(v)) for k, v in dict(data.get("layers", {})).items()]
    return Recipe(
        default=_scheme_or_none(data.get("default", "none")),
        layers=layers,
        min_params=int(data.get("min_params", DEFAULT_MIN_PARAMS)),
        fallback=_scheme_or_none(data.get("fallback", "w8")),
        source=path.name,
    )
