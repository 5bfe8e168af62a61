"""A GPT-2-style decoder in torch with seeded random weights, exported as two static ONNX files (opset 17).

    from edgecc.models import gpt
    gpt.export_gpt_prefill("prefill.onnx", seq_len=128)   # input_ids [1,128] -> logits + present KV
    gpt.export_gpt_decode("decode.onnx", past_len=128)    # one token + past KV [.., 128, ..] -> logits + KV [.., 129, ..]
    feeds = gpt.decode_feeds(past_len=128, seed=0)

Architecture (GPT-2): token + learned position embeddings, pre-LN blocks (fused QKV linear, causal multi-head
attention, output projection; 4x MLP with tanh-GELU), final LayerNorm, an untied ``lm_head`` without bias.
The default :data:`GPT_SMALL6` has GPT-2 small's per-layer sizes (d_model 768, 12 heads, MLP 3072) with 6 layers and
an 8192-token vocabulary: about 55 M parameters, 220 MB fp32 (``lm_head`` and the matmul weights that a
decode step streams: about 195 MB). :data:`GPT_TINY` (2 layers, d 64) is for tests.

Graphs (static shapes, TorchScript "legacy" exporter, constant folding on):

* prefill: ``input_ids`` int64 [1, S] -> ``logits`` [1, S, vocab], ``present_key_i`` / ``present_value_i``
  [1, heads, S, head_dim] for every layer i. Positions 0..S-1 are a constant slice of the position table and
  the causal mask is a constant: nothing depends on a symbolic dim.
* decode: ``input_ids`` int64 [1, 1], ``position_ids`` int64 [1, 1] (the position of the new token, normally
  P), ``past_key_i`` / ``past_value_i`` [1, heads, P, head_dim] -> ``logits`` [1, 1, vocab] and
  ``present_key_i`` / ``present_value_i`` [1, heads, P+1, head_dim] (Concat of past and new, as ONNX LLM
  exports do). The single new query attends to every past position, so no mask is needed.

Weights come from ``numpy.random.default_rng(seed)`` (independent of torch's RNG) and the saved file has
fixed metadata, so the same config, seed and length give the same bytes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecc.models.onnx_io import canonicalize

OPSET = 17
PRODUCER = "edgecc.models.gpt"


@dataclass(frozen=True)
class GPTConfig:
    n_layers: int = 6
    d_model: int = 768
    n_heads: int = 12
    vocab: int = 8192
    max_positions: int = 1024
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")


GPT_SMALL6 = GPTConfig()
GPT_TINY = GPTConfig(n_layers=2, d_model=64, n_heads=4, vocab=256, max_positions=64)


def _torch():
    import torch

    return torch


def _make_module(cfg: GPTConfig):
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
            self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

        def forward(self, x, past_k, past_v, mask):
            b, s, _ = x.shape
            h, hd = cfg.n_heads, cfg.head_dim
            q, k, v = self.c_attn(x).split(cfg.d_model, dim=-1)
            q = q.reshape(b, s, h, hd).transpose(1, 2)
            k = k.reshape(b, s, h, hd).transpose(1, 2)
            v = v.reshape(b, s, h, hd).transpose(1, 2)
            if past_k is not None:
                k = torch.cat([past_k, k], dim=2)
                v = torch.cat([past_v, v], dim=2)
            scores = torch.matmul(q, k.transpose(-1, -2)) * (hd**-0.5)
            if mask is not None:
                scores = scores + mask
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.c_proj(out.transpose(1, 2).reshape(b, s, cfg.d_model)), k, v

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.d_model)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(cfg.d_model)
            self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
            self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

        def forward(self, x, past_k, past_v, mask):
            a, k, v = self.attn(self.ln_1(x), past_k, past_v, mask)
            x = x + a
            x = x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))
            return x, k, v

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
            self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

        def _run(self, x, pasts, mask):
            presents = []
            for i, block in enumerate(self.blocks):
                pk, pv = (pasts[2 * i], pasts[2 * i + 1]) if pasts else (None, None)
                x, k, v = block(x, pk, pv, mask)
                presents += [k, v]
            return (self.lm_head(self.ln_f(x)), *presents)

    class Prefill(nn.Module):
        """input_ids [1, S] -> logits, present_key_0, present_value_0, ..."""

        def __init__(self, gpt) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, input_ids):
            s = input_ids.shape[1]  # static under tracing: becomes constants below
            x = self.gpt.wte(input_ids) + self.gpt.wpe.weight[:s].unsqueeze(0)
            # A constant [S, S] additive causal mask (built in numpy: no Trilu or Range node in the graph).
            mask = torch.from_numpy(np.triu(np.full((s, s), np.finfo(np.float32).min, dtype=np.float32), 1))
            return self.gpt._run(x, None, mask)

    class Decode(nn.Module):
        """input_ids [1, 1], position_ids [1, 1], past_key_0, past_value_0, ... -> logits, present_*"""

        def __init__(self, gpt) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, input_ids, position_ids, *pasts):
            x = self.gpt.wte(input_ids) + self.gpt.wpe(position_ids)
            return self.gpt._run(x, list(pasts), None)

    return GPT, Prefill, Decode


def build_model(cfg: GPTConfig = GPT_SMALL6, seed: int = 0):
    """-> (prefill module, decode module), sharing one seeded GPT (eval mode)."""
    torch = _torch()
    GPT, Prefill, Decode = _make_module(cfg)
    gpt = GPT()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(gpt.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(param.shape)
            leaf = name.rsplit(".", 1)[-1]
            if param.dim() >= 2:  # Linear [out, in] and Embedding [rows, d]: scale by the last dim
                value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
            elif leaf == "weight":  # LayerNorm scale
                value = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                value = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            param.copy_(torch.from_numpy(value))
    gpt.eval()
    return Prefill(gpt).eval(), Decode(gpt).eval()


def kv_names(cfg: GPTConfig, prefix: str) -> list[str]:
    """["<prefix>_key_0", "<prefix>_value_0", "<prefix>_key_1", ...]"""
    return [f"{prefix}_{kind}_{i}" for i in range(cfg.n_layers) for kind in ("key", "value")]


def prefill_io(cfg: GPTConfig) -> tuple[list[str], list[str]]:
    return ["input_ids"], ["logits", *kv_names(cfg, "present")]


def decode_io(cfg: GPTConfig) -> tuple[list[str], list[str]]:
    return ["input_ids", "position_ids", *kv_names(cfg, "past")], ["logits", *kv_names(cfg, "present")]


# --------------------------------------------------------------------------------------------------------------
# Feeds


def prefill_feeds(seq_len: int = 128, cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid token ids [1, seq_len]."""
    rng = np.random.default_rng(2000 + seed)
    return {"input_ids": rng.integers(0, cfg.vocab, (1, seq_len), dtype=np.int64)}


def decode_feeds(past_len: int = 128, cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid token id, position ``past_len`` and standard-normal past keys/values [1, heads, past_len, hd]."""
    rng = np.random.default_rng(3000 + seed)
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab, (1, 1), dtype=np.int64),
        "position_ids": np.full((1, 1), past_len, dtype=np.int64),
    }
    shape = (1, cfg.n_heads, past_len, cfg.head_dim)
    for name in kv_names(cfg, "past"):
        feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


# --------------------------------------------------------------------------------------------------------------
# Torch reference


def torch_prefill(feeds: dict[str, np.ndarray], cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> dict[str, np.ndarray]:
    torch = _torch()
    prefill, _ = build_model(cfg, seed)
    with torch.no_grad():
        outs = prefill(torch.from_numpy(feeds["input_ids"]))
    return {n: o.numpy() for n, o in zip(prefill_io(cfg)[1], outs)}


def torch_decode(feeds: dict[str, np.ndarray], cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> dict[str, np.ndarray]:
    torch = _torch()
    _, decode = build_model(cfg, seed)
    names = decode_io(cfg)[0]
    with torch.no_grad():
        outs = decode(*[torch.from_numpy(feeds[n]) for n in names])
    return {n: o.numpy() for n, o in zip(decode_io(cfg)[1], outs)}


# --------------------------------------------------------------------------------------------------------------
# Export


def _check_len(name: str, value: int, cfg: GPTConfig, extra: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= cfg.max_positions - extra:
        raise ValueError(f"{name} must be an int in [1, {cfg.max_positions - extra}], got {value!r}")


def _export(module, example, path: Path, io) -> Path:
    torch = _torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    canonicalize(path, PRODUCER)
    return path


def export_gpt_prefill(path, seq_len: int = 128, cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> Path:
    """Write the static prefill graph (``input_ids`` [1, seq_len]) to ``path``; returns the Path."""
    _check_len("seq_len", seq_len, cfg, 0)
    torch = _torch()
    prefill, _ = build_model(cfg, seed)
    example = (torch.from_numpy(prefill_feeds(seq_len, cfg)["input_ids"]),)
    return _export(prefill, example, Path(path), prefill_io(cfg))


def export_gpt_decode(path, past_len: int = 128, cfg: GPTConfig = GPT_SMALL6, seed: int = 0) -> Path:
    """Write the static one-token decode graph (past KV of length ``past_len``) to ``path``; returns the Path."""
    _check_len("past_len", past_len, cfg, 1)
    torch = _torch()
    _, decode = build_model(cfg, seed)
    feeds = decode_feeds(past_len, cfg)
    example = tuple(torch.from_numpy(feeds[n]) for n in decode_io(cfg)[0])
    return _export(decode, example, Path(path), decode_io(cfg))


def streamed_weight_bytes(onnx_path) -> dict[str, int]:
    """Bytes a decode step must read from memory: initializers, minus tables only gathered from.

    Returns {"weights": all initializer bytes, "gathered_tables": bytes of initializers used only as a
    Gather's data (a step reads one row of each), "streamed": the difference}. Past KV inputs are not counted
    here (they are inputs, not weights).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    sizes = {i.name: numpy_helper.to_array(i).nbytes for i in model.graph.initializer}
    uses: dict[str, set[str]] = {}
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            if name in sizes:
                uses.setdefault(name, set()).add(node.op_type if pos == 0 else f"{node.op_type}:{pos}")
    gathered = sum(sizes[n] for n, ops in uses.items() if ops == {"Gather"})
    total = sum(sizes.values())
    return {"weights": total, "gathered_tables": gathered, "streamed": total - gathered}
