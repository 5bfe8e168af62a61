"""The tokenizer stored in a GGUF file's metadata, rebuilt with Hugging Face `tokenizers`.

GGUF files carry their vocabulary (`tokenizer.ggml.tokens`), BPE merges, token types (3 = control/special) and
the chat template (Jinja). For `tokenizer.ggml.model == "gpt2"` (byte-level BPE, as SmolLM2 uses) that is all a
tokenizer needs; the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` (for "smollm": split digits one by
one, then GPT-2's regex). The result is saved as `tokenizer.json`, which the artifact carries, so `edgecc
generate` needs neither the GGUF nor the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgecc.errors import EdgeccError

# llama.cpp pre-tokenizer names whose regex is GPT-2's with digits split one by one (llama-vocab.cpp).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_TOKEN_TYPE_CONTROL = 3


@dataclass
class TokenizerSpec:
    """Everything `generate` needs besides the tokenizer itself."""

    tokenizer_json: str
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    chat_template: str | None
    special_tokens: list[str] = field(default_factory=list)

    def to_meta(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "add_bos": self.add_bos,
                "chat_template": self.chat_template}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def tokenizer_from_gguf(reader) -> TokenizerSpec:
    """Build the tokenizer described by a `gguf.GGUFReader`'s metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise EdgeccError("the GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens)",
                          "use a GGUF exported with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes it)")
    if kind != "gpt2":
        raise EdgeccError(f"GGUF tokenizer model '{kind}' is not supported (only byte-level BPE 'gpt2')",
                          "export the model's tokenizer.json with Hugging Face and pass it instead")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type", [])
    special = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return TokenizerSpec(
        tokenizer_json=tok.to_str(),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=int(eos) if eos is not None else None,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        special_tokens=special,
    )


class TextTokenizer:
    """encode/decode plus the chat template, from a saved `tokenizer.json` and its `tokenizer_meta.json`."""

    def __init__(self, tokenizer_json: str, meta: dict):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        self.bos_token_id = meta.get("bos_token_id")
        self.eos_token_id = meta.get("eos_token_id")
        self.add_bos = bool(meta.get("add_bos"))
        self.chat_template = meta.get("chat_template")

    @classmethod
    def from_dir(cls, directory: str | Path) -> "TextTokenizer":
        directory = Path(directory)
        tj, mj = directory / "tokenizer.json", directory / "tokenizer_meta.json"
        if not tj.exists() or not mj.exists():
            raise EdgeccError(f"'{directory}' has no tokenizer (tokenizer.json + tokenizer_meta.json)",
                              "build the decoder from an export that ships its tokenizer "
                              "(edgecc.models.smollm2.export_smollm2 writes both), or pass --tokenizer DIR")
        return cls(tj.read_text(), json.loads(mj.read_text()))

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, prompt: str) -> str:
        """One user turn, followed by the assistant's generation prompt."""
        if not self.chat_template:
            raise EdgeccError("this model's tokenizer has no chat template", "drop --chat and give the raw prompt")
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)


def save_tokenizer(spec: TokenizerSpec, directory: str | Path) -> None:
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(spec.tokenizer_json)
    (directory / "tokenizer_meta.json").write_text(json.dumps(spec.to_meta(), indent=1, sort_keys=True) + "\n")
