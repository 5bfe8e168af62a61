"""Tiny generated models for fast tests: small torch modules with seeded weights, exported to ONNX opset 17.

| name | input | output | what it exercises |
| --- | --- | --- | --- |
| ``tiny_transformer`` | ``input_ids`` int64 [1, 16] | ``last_hidden_state`` float32 [1, 16, 64] | Gather embedding, 2 pre-LN encoder blocks: 4-head attention (MatMul/Reshape/Transpose/Softmax), LayerNormalization, exact-GELU (Erf) MLP |
| ``tiny_cnn`` | ``image`` float32 [1, 3, 32, 32] | ``logits`` float32 [1, 10] | Conv, BatchNormalization (kept, not folded), Relu, MaxPool, GlobalAveragePool, Flatten, Gemm |
| ``tiny_mlp`` | ``x`` float32 [1, 32] | ``y`` float32 [1, 10] | Gemm, Relu, Tanh |

Weights come from ``numpy.random.default_rng(seed)`` (not torch's RNG, so they do not change with the torch
version), the export uses the legacy TorchScript exporter with static shapes, and the saved file has fixed
metadata: the same seed gives the same bytes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgecc.models.onnx_io import canonicalize

OPSET = 17
PRODUCER = "edgecc.models.synthetic"

# tiny_transformer dimensions
VOCAB, D_MODEL, N_HEADS, SEQ_LEN, N_LAYERS, D_FF = 256, 64, 4, 16, 2, 128


def _torch():
    import torch

    return torch


def _fill(module, seed: int):
    """Overwrite every parameter and buffer of `module` from a numpy generator, in name order."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(param.shape)
            leaf = name.rsplit(".", 1)[-1]
            if param.dim() >= 2:
                fan_in = int(np.prod(shape[1:]))
                value = rng.standard_normal(shape) / np.sqrt(fan_in)
            elif leaf == "weight":  # LayerNorm / BatchNorm scale
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                value = 0.05 * rng.standard_normal(shape)
            param.copy_(torch.from_numpy(value.astype(np.float32)))
        for name, buf in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                buf.copy_(torch.from_numpy((0.1 * rng.standard_normal(tuple(buf.shape))).astype(np.float32)))
            elif leaf == "running_var":
                buf.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(buf.shape)).astype(np.float32)))
    module.eval()
    return module


# --------------------------------------------------------------------------------------------------------------
# Modules


def _transformer_module():
    torch = _torch()
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
            self.proj = nn.Linear(D_MODEL, D_MODEL)

        def forward(self, x):
            b, s, _ = x.shape
            head = D_MODEL // N_HEADS
            q, k, v = self.qkv(x).split(D_MODEL, dim=-1)
            q = q.reshape(b, s, N_HEADS, head).transpose(1, 2)
            k = k.reshape(b, s, N_HEADS, head).transpose(1, 2)
            v = v.reshape(b, s, N_HEADS, head).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(-1, -2)) * (head**-0.5)
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.proj(out.transpose(1, 2).reshape(b, s, D_MODEL))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(D_MODEL)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(D_MODEL)
            self.fc1 = nn.Linear(D_MODEL, D_FF)
            self.fc2 = nn.Linear(D_FF, D_MODEL)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, D_MODEL)
            self.pos = nn.Parameter(torch.zeros(1, SEQ_LEN, D_MODEL))
            self.blocks = nn.ModuleList([Block() for _ in range(N_LAYERS)])
            self.ln_f = nn.LayerNorm(D_MODEL)

        def forward(self, input_ids):
            x = self.tok(input_ids) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)

    return TinyTransformer()


def _cnn_module():
    torch = _torch()
    nn = torch.nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, image):
            x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(image))), 2)
            x = torch.relu(self.bn2(self.conv2(x)))
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)

    return TinyCNN()


def _mlp_module():
    torch = _torch()
    nn = torch.nn

    class TinyMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(32, 64)
            self.fc2 = nn.Linear(64, 64)
            self.fc3 = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))

    return TinyMLP()


# --------------------------------------------------------------------------------------------------------------
# Specs, feeds, export


@dataclass(frozen=True)
class SyntheticSpec:
    name: str
    description: str
    make_module: Callable[[], object]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_feeds: Callable[[int], dict[str, np.ndarray]]
    fold_constants: bool = True  # False keeps BatchNormalization as its own node instead of folding it into Conv


def _transformer_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {"input_ids": rng.integers(0, VOCAB, (1, SEQ_LEN), dtype=np.int64)}


def _cnn_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}


def _mlp_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {"x": rng.standard_normal((1, 32)).astype(np.float32)}


SPECS: dict[str, SyntheticSpec] = {
    "tiny_transformer": SyntheticSpec(
        "tiny_transformer",
        f"{N_LAYERS}-layer pre-LN transformer encoder, d={D_MODEL}, {N_HEADS} heads, seq {SEQ_LEN}, vocab {VOCAB}",
        _transformer_module,
        ("input_ids",),
        ("last_hidden_state",),
        _transformer_feeds,
    ),
    "tiny_cnn": SyntheticSpec(
        "tiny_cnn",
        "conv/bn/relu/maxpool + conv/bn/relu/global-avgpool + linear, 3x32x32 -> 10",
        _cnn_module,
        ("image",),
        ("logits",),
        _cnn_feeds,
        fold_constants=False,
    ),
    "tiny_mlp": SyntheticSpec(
        "tiny_mlp", "32 -> 64 -> 64 -> 10 MLP (relu, tanh)", _mlp_module, ("x",), ("y",), _mlp_feeds
    ),
}


def build_module(name: str, seed: int = 0):
    """The seeded torch module (eval mode) behind synthetic model `name`."""
    spec = SPECS[name]
    return _fill(spec.make_module(), seed)


def input_feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Example inputs for synthetic model `name` (numpy, keyed by ONNX input name)."""
    return SPECS[name].make_feeds(seed)


def torch_outputs(name: str, feeds: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Run the torch module (same `seed` as the export) on `feeds`; the reference the ONNX must match."""
    torch = _torch()
    spec = SPECS[name]
    module = build_module(name, seed)
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {n: o.numpy() for n, o in zip(spec.output_names, outs)}


def export(name: str, path, seed: int = 0) -> Path:
    """Export synthetic model `name` with weights from `seed` to `path` (static shapes, opset 17)."""
    torch = _torch()
    spec = SPECS[name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = build_module(name, seed)
    example = tuple(torch.from_numpy(v) for v in spec.make_feeds(0).values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=spec.fold_constants,
        )
    canonicalize(path, PRODUCER)
    return path


def export_tiny_transformer(path, seed: int = 0) -> Path:
    return export("tiny_transformer", path, seed)


def export_tiny_cnn(path, seed: int = 0) -> Path:
    return export("tiny_cnn", path, seed)


def export_tiny_mlp(path, seed: int = 0) -> Path:
    return export("tiny_mlp", path, seed)
