"""Calibration data for GPTQ, AWQ and SmoothQuant: statistics of each linear layer's *input* activations.

What is kept per input (shared by the linears that read the same tensor, e.g. q/k/v):

* `hessian`  H = sum x^T x over calibration rows (float64 [K, K]): GPTQ's Hessian (up to 2/M) and the exact
  output error of any quantized weight, tr(dW^T H dW) (AWQ's search loss);
* `absmean`  mean |x_k| (AWQ's salience), `absmax` max |x_k| (SmoothQuant);
* `first_rows` the input row at the first position of each sequence ([B, S, K] inputs with S > 1): a causal
  LM's attention sink. AWQ weights it up in its loss (`sink_hessian`); see awq.py.

Sources:

* a torch model (`collect_torch`): forward hooks on its nn.Linear modules, keyed by module name; for an LLM
  the text of `--calib-text file.txt` is tokenized and cut into chunks of N tokens (`text_chunks`);
* an ONNX model (`collect_onnx`): onnxruntime runs it with the activation input of every MatMul/Gemm whose
  weight is an initializer added as an extra graph output, on the samples of `--calib file.npz` (one array
  per model input; an extra leading axis holds several samples) or on token chunks of a text for models
  that take `input_ids`. Keyed by initializer name and by the weight's content, so the decode graph of an
  LLM finds the activations measured on its prefill graph.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecc.errors import EdgeccError

DEFAULT_CHUNK = 128
DEFAULT_MAX_CHUNKS = 32


def progress_track(items, description: str, total: int | None = None):
    """A progress bar (rich, on stderr) over `items`; it disappears when done."""
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, total=total, transient=True, console=Console(stderr=True))


def weight_key(w_kn: np.ndarray) -> str:
    """Content key of a [K, N] float weight (so two graphs sharing a weight share its calibration)."""
    a = np.ascontiguousarray(np.asarray(w_kn, np.float32))
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


@dataclass
class ActStats:
    """Running statistics of one input tensor (rows x of width K)."""

    k: int
    hessian: np.ndarray = None  # sum x^T x, float64 [K, K]
    abs_sum: np.ndarray = None
    absmax: np.ndarray = None
    count: int = 0
    first_rows: list = field(default_factory=list)  # float64 [K] each: position 0 of every sequence

    def __post_init__(self):
        if self.hessian is None:
            self.hessian = np.zeros((self.k, self.k), np.float64)
            self.abs_sum = np.zeros(self.k, np.float64)
            self.absmax = np.zeros(self.k, np.float64)

    def add(self, x) -> None:
        """Add rows x [..., K] (numpy or torch); for sequences [..., S, K] (S > 1) also keep position 0."""
        if x.ndim >= 3 and x.shape[-2] > 1:
            first = x[..., 0, :].reshape(-1, self.k)
            first = first.detach().double().numpy() if hasattr(first, "detach") else np.asarray(first, np.float64)
            self.first_rows += list(first)
        try:
            import torch

            if isinstance(x, torch.Tensor):
                x2 = x.detach().reshape(-1, self.k).to(torch.float32)
                self.hessian += (x2.T @ x2).to(torch.float64).numpy()  # per batch in fp32, summed in fp64
                a = x2.to(torch.float64).abs()
                self.abs_sum += a.sum(0).numpy()
                self.absmax = np.maximum(self.absmax, a.amax(0).numpy())
                self.count += x2.shape[0]
                return
        except ImportError:  # pragma: no cover
            pass
        x2 = np.asarray(x, np.float64).reshape(-1, self.k)
        self.hessian += x2.T @ x2
        a = np.abs(x2)
        self.abs_sum += a.sum(0)
        self.absmax = np.maximum(self.absmax, a.max(0))
        self.count += x2.shape[0]

    @property
    def absmean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def sink_hessian(self) -> np.ndarray | None:
        """sum x0^T x0 over the first positions (part of `hessian`), or None for non-sequence inputs."""
        if not self.first_rows:
            return None
        x0 = np.stack(self.first_rows)
        return x0.T @ x0


@dataclass
class Calibration:
    """Weight name -> statistics of that weight's input; plus a content-key index."""

    stats: dict[str, ActStats] = field(default_factory=dict)
    by_key: dict[str, ActStats] = field(default_factory=dict)
    source: str = ""

    def lookup(self, name: str, w_kn: np.ndarray | None = None) -> ActStats | None:
        """The statistics of the weight `w_kn` (by content first), else of the weight called `name`.

        Content first: an LLM's decode graph is calibrated through its prefill graph, and torch's generated
        initializer names (`onnx::MatMul_484`) name different weights in the two graphs."""
        st = None
        if w_kn is not None and self.by_key:
            st = self.by_key.get(weight_key(w_kn))
        if st is None:
            st = self.stats.get(name)
        if st is not None and w_kn is not None and st.k != w_kn.shape[0]:
            return None
        return st


# ------------------------------------------------------------------------------------------ text


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EdgeccError(f"--calib-text file {path} does not exist", "give a UTF-8 text file to calibrate on")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EdgeccError(f"--calib-text file {path} is empty", "give a text with at least a few hundred tokens")
    return text


def text_chunks(ids: list[int], chunk: int = DEFAULT_CHUNK, max_chunks: int = DEFAULT_MAX_CHUNKS,
                source: str = "the calibration text") -> list[np.ndarray]:
    """Token ids -> up to `max_chunks` int64 chunks of exactly `chunk` tokens (a short text: one shorter chunk
    when only variable lengths are allowed is not offered; the last partial chunk is dropped)."""
    if len(ids) == 0:
        raise EdgeccError(f"{source} gives no tokens", "give a non-empty text")
    n = len(ids) // chunk
    if n == 0:
        raise EdgeccError(f"{source} has {len(ids)} tokens, fewer than one chunk of {chunk}",
                          f"give a longer text (at least {chunk} tokens)")
    return [np.asarray(ids[i * chunk:(i + 1) * chunk], np.int64) for i in range(min(n, max_chunks))]


# ------------------------------------------------------------------------------------------ torch


def collect_torch(model, batches, linears: dict | None = None, desc: str = "calibrating",
                  quiet: bool = False, skip_first: int = 0) -> Calibration:
    """Run `model(batch)` (a callable taking one batch) for every batch and collect the inputs of its
    nn.Linear modules (or the given name -> module dict). Linears fed the same tensor share one ActStats.
    `skip_first`: leave out the first positions of each [batch, seq, K] input (an LLM's attention-sink
    token carries activations orders of magnitude above the rest and would dominate the statistics)."""
    import torch
    from torch import nn

    runner = model
    module = getattr(model, "__self__", model)
    if linears is None:
        linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    cal = Calibration(source="torch")
    last: dict = {"x": None, "stats": None}

    def hook_for(name):
        def hook(_mod, inputs, _out):
            x = inputs[0]
            if last["x"] is x:  # same tensor as the previous linear's input (q/k/v, gate/up): share
                st = last["stats"]
                if cal.stats.get(name) is None:
                    cal.stats[name] = st
                return
            st = cal.stats.get(name)
            if st is None:
                st = cal.stats[name] = ActStats(x.shape[-1])
            st.add(x[:, skip_first:] if skip_first and x.dim() == 3 else x)
            last["x"], last["stats"] = x, st
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in (batches if quiet else progress_track(batches, desc, total=len(batches))):
                last["x"] = None
                runner(batch)
    finally:
        for h in handles:
            h.remove()
    return cal


def llama_calibration(model, ids: list[int], chunk: int = DEFAULT_CHUNK, max_chunks: int = DEFAULT_MAX_CHUNKS,
                      source: str = "the calibration text", skip_first: int = 0) -> Calibration:
    """Statistics of every block linear of an edgecc torch Llama over chunks of the token ids."""
    import torch

    chunks = text_chunks(ids, chunk, max_chunks, source)
    mask = torch.full((chunk, chunk), float("-inf")).triu(1)
    pos = torch.arange(chunk)
    linears = {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}

    def run(c):
        model.run(torch.from_numpy(c)[None], pos, [], mask)

    return collect_torch(run, chunks, linears, skip_first=skip_first)


# ------------------------------------------------------------------------------------------ onnx


def _weight_inputs(model) -> list[tuple[str, str, np.ndarray]]:
    """(activation tensor, initializer name, weight as [K, N]) for every MatMul/Gemm with a constant weight."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        b, transpose = node.input[1], bool(attrs.get("transB", 0)) if node.op_type == "Gemm" else False
        prod = producers.get(b)
        if b not in inits and prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
            perm = [a.ints for a in prod.attribute if a.name == "perm"]
            if perm and list(perm[0]) not in ([1, 0], []):
                continue
            b, transpose = prod.input[0], not transpose
        if b not in inits:
            continue
        w = numpy_helper.to_array(inits[b])
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        out.append((node.input[0], b, w.T if transpose else w))
    return out


def _input_specs(model) -> dict[str, tuple[list, np.dtype]]:
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[vi.name] = (dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


def npz_feeds(model, path: str | Path) -> list[dict[str, np.ndarray]]:
    """The samples of a calibration .npz: one array per model input, optionally with a leading sample axis."""
    path = Path(path)
    if not path.is_file():
        raise EdgeccError(f"--calib file {path} does not exist", "give an .npz with one array per model input")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as exc:  # noqa: BLE001 - any read error is the user's file
        raise EdgeccError(f"cannot read --calib {path}: {exc}",
                          "write it with numpy.savez(path, name=array, ...)") from exc
    specs = _input_specs(model)
    missing = [n for n in specs if n not in data]
    extra = [n for n in data if n not in specs]
    if missing or extra:
        raise EdgeccError(f"--calib {path.name} has inputs {sorted(data)} but the model takes {list(specs)}"
                          + (f" (missing {missing})" if missing else ""),
                          "save one array per model input, named as the model's inputs")
    n_samples = None
    per_input = {}
    for name, (dims, dtype) in specs.items():
        arr = data[name]
        if arr.ndim == len(dims) + 1:
            samples = list(arr)
        elif arr.ndim == len(dims):
            samples = [arr]
        else:
            raise EdgeccError(f"--calib input '{name}' has shape {list(arr.shape)}, the model expects "
                              f"{['?' if d is None else d for d in dims]}",
                              "give that shape, or add a leading axis of samples")
        for s in samples:
            bad = [i for i, (d, v) in enumerate(zip(dims, s.shape)) if d is not None and d != v]
            if bad:
                raise EdgeccError(f"--calib input '{name}' has sample shape {list(s.shape)}, the model expects "
                                  f"{['?' if d is None else d for d in dims]}", "match the model's input shape")
        if n_samples is not None and len(samples) != n_samples:
            raise EdgeccError(f"--calib inputs hold different numbers of samples ({n_samples} vs {len(samples)})",
                              "give every input the same leading sample axis")
        n_samples = len(samples)
        per_input[name] = [np.asarray(s).astype(dtype, copy=False) for s in samples]
    if not n_samples:
        raise EdgeccError(f"--calib {path.name} holds no samples", "give at least one sample per input")
    return [{n: per_input[n][i] for n in specs} for i in range(n_samples)]


def text_feeds(model, ids: list[int], chunk: int | None = None, max_chunks: int = DEFAULT_MAX_CHUNKS,
               source: str = "--calib-text") -> list[dict[str, np.ndarray]]:
    """Feeds for a model that takes token ids: `input_ids` gets chunks of the text; attention_mask ones,
    token_type_ids zeros, position ids a range, last_index the last position."""
    specs = _input_specs(model)
    ids_name = next((n for n in specs if "input_ids" in n), None)
    if ids_name is None:
        raise EdgeccError(f"--calib-text needs a model input named input_ids, this one takes {list(specs)}",
                          "give --calib file.npz with one array per input instead")
    dims = specs[ids_name][0]
    static = dims[-1] if dims and dims[-1] else None
    length = static or chunk or DEFAULT_CHUNK
    feeds = []
    for c in text_chunks(ids, length, max_chunks, source):
        feed = {}
        for name, (d, dtype) in specs.items():
            low = name.lower()
            if name == ids_name:
                v = c[None]
            elif "mask" in low:
                v = np.ones((1, length))
            elif "token_type" in low:
                v = np.zeros((1, length))
            elif "position" in low:
                v = np.arange(length)[None]
            elif "last_index" in low:
                v = np.array([length - 1])
            else:
                raise EdgeccError(f"--calib-text cannot fill the model input '{name}'",
                                  "give --calib file.npz with one array per input instead")
            feed[name] = v.reshape([x if x else v.shape[i] for i, x in enumerate(d)] if len(d) == v.ndim
                                   else v.shape).astype(dtype)
        feeds.append(feed)
    return feeds


def collect_onnx(model_or_path, feeds: list[dict[str, np.ndarray]], desc: str = "calibrating") -> Calibration:
    """Run the ONNX model with onnxruntime on every feed, with the inputs of its weight matmuls as extra
    outputs, and collect their statistics (keyed by initializer name and weight content)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    pairs = _weight_inputs(model)
    cal = Calibration(source="onnx")
    if not pairs:
        return cal
    acts = sorted({a for a, _, _ in pairs})
    graph_inputs = {vi.name for vi in model.graph.input}
    existing = {o.name for o in model.graph.output}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for a in acts:
        if a not in existing and a not in graph_inputs:
            m.graph.output.append(onnx.ValueInfoProto(name=a))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    stats: dict[str, ActStats] = {}
    for feed in progress_track(feeds, desc, total=len(feeds)):
        try:
            values = dict(zip(out_names, sess.run(out_names, feed)))
        except Exception as exc:  # noqa: BLE001 - onnxruntime rejects the user's data
            raise EdgeccError(f"onnxruntime cannot run the calibration data: {str(exc).splitlines()[0][:200]}",
                              "give inputs with the model's names, dtypes and shapes") from exc
        for a in acts:
            x = values[a] if a in values else feed[a]
            if a not in stats:
                stats[a] = ActStats(int(x.shape[-1]))
            stats[a].add(x)
    for a, name, w_kn in pairs:
        st = stats[a]
        if st.k != w_kn.shape[0]:
            continue
        cal.stats[name] = st
        cal.by_key[weight_key(w_kn)] = st
    return cal


def calibrate_onnx(onnx_path: str | Path, calib: str | Path | None = None, calib_text: str | Path | None = None,
                   tokenizer_dir: str | Path | None = None, chunk: int | None = None,
                   max_chunks: int = DEFAULT_MAX_CHUNKS) -> Calibration:
    """`--calib file.npz` or `--calib-text file.txt` for an ONNX model -> Calibration."""
    from edgecc.frontend.loader import load_model

    model = load_model(onnx_path)
    if calib is not None:
        feeds = npz_feeds(model, calib)
    elif calib_text is not None:
        text = read_text(calib_text)
        tdir = Path(tokenizer_dir) if tokenizer_dir else Path(onnx_path).parent
        if not (tdir / "tokenizer.json").is_file():
            raise EdgeccError(f"--calib-text needs a tokenizer.json (none in {tdir})",
                              "export the model with its tokenizer or give --calib file.npz")
        from edgecc.models.gguf_tokenizer import TextTokenizer

        ids = TextTokenizer.from_dir(tdir).encode(text)
        feeds = text_feeds(model, ids, chunk, max_chunks, f"--calib-text {Path(calib_text).name}")
    else:
        raise EdgeccError("this quantization method needs calibration data",
                          "give --calib file.npz (model inputs) or --calib-text file.txt")
    return collect_onnx(model, feeds)
