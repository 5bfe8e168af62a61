"""A decoder artifact at run time: the KV cache allocated once, prefill, decode steps, and the generation loop.

The artifact's `prefill` / `decode` functions (edgecc.build_llm) take their inputs, then every cache buffer,
then the write position `R.Shape([pos])`, then the weights; they return their outputs followed by the
caches, updated in place. The session owns the caches (allocated once, at `max_context`), so memory does
not grow from token to token.

Prompt handling: a prompt of up to the prefill length runs in one prefill call (padded on the right; the
causal mask keeps padding out of the real tokens, and decode overwrites the padded cache rows). Longer
prompts run their first chunk through prefill and the rest through decode, one token at a time. A prompt
longer than `max_context` is an error; generation stops when the cache is full (reported, not an error).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.runtime_bridge import artifact as art
from edgecc.runtime_bridge.host import default_num_threads, set_num_threads
from edgecc.runtime_bridge.params_file import read_params
from edgecc.runtime_bridge.weight_memory import load_weights


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt processing + first token
    decode_s: float = 0.0  # the steps after the first token
    peak_rss_bytes: int = 0
    stopped: str = ""  # "eos", "max_new_tokens", "max_context"

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class Sampler:
    """Greedy when temperature == 0; else temperature + nucleus (top-p) sampling with a seeded RNG."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EdgeccError(f"bad sampling options: temperature {self.temperature}, top-p {self.top_p}",
                              "use temperature >= 0 and 0 < top-p <= 1")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, self.top_p) + 1)]
        q = p[keep] / p[keep].sum()
        return int(self._rng.choice(keep, p=q))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LLMSession:
    """Load a decoder artifact; `prefill(ids)` / `decode(token)` return the next-token logits."""

    def __init__(self, artifact_dir: str | Path, num_threads: int | None = None):
        import platform

        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.dir = Path(artifact_dir)
        self.manifest = art.read_manifest(self.dir)
        self.llm = self.manifest.get("llm")
        if not self.llm:
            raise EdgeccError(f"'{self.dir}' is not a decoder artifact (no KV cache in its manifest)",
                              "build the decoder with `edgecc build DECODER --max-context N` (see docs/llm.md)")
        art.verify_file_hashes(self.dir, self.manifest)
        if self.manifest["target"]["arch"] != platform.machine() or self.manifest["target"]["device"] != "cpu":
            raise EdgeccError(f"'{self.dir}' was built for {self.manifest['target']['name']}; generation runs "
                              "only on the machine it was built for", "rebuild with -t host, or run on the board")
        set_num_threads(num_threads or default_num_threads())
        self._tvm = tvm
        self._dev = tvm.cpu()
        self._vm = VirtualMachine(art.load_library(self.dir), self._dev)
        layout = self.llm["kv_cache"]
        self.max_context = int(self.llm["max_context"])
        weights = [w for _, w in read_params(self.dir / art.PARAMS)]
        # weights and KV cache are streamed on every decode step: one huge-page arena for both
        self._arena = load_weights(weights + [np.zeros(s, dtype=layout["dtype"]) for s in layout["shapes"]],
                                   self._dev)
        self._weights = self._arena.tensors[:len(weights)]
        self._caches = self._arena.tensors[len(weights):]
        self.entries = self.llm["entries"]
        self.prefill_len = self.entries["prefill"]["seq"] if "prefill" in self.entries else 0
        self.position = 0
        logits = self.entries["decode"]["outputs"][0]
        self.vocab = int(logits["shape"][-1]) if logits["shape"] and isinstance(logits["shape"][-1], int) else None

    def _check_ids(self, ids: list[int]) -> None:
        """Out-of-range ids would make the embedding gather read outside its table."""
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or t < 0
               or (self.vocab is not None and t >= self.vocab)]
        if bad:
            raise EdgeccError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab})",
                              "encode the prompt with the model's own tokenizer")

    # ---------------------------------------------------------------------------------------------- calls

    def reset(self) -> None:
        """Forget the context (the cache rows are simply overwritten by the next prompt)."""
        self.position = 0

    def _call(self, entry: str, feeds: dict[str, np.ndarray], pos: int) -> np.ndarray:
        import tvm_ffi

        tvm = self._tvm
        args = []
        for sig in self.entries[entry]["inputs"]:
            args.append(tvm.runtime.tensor(np.ascontiguousarray(feeds[sig["name"]], dtype=sig["dtype"]), self._dev))
        out = self._vm[entry](*args, *self._caches, tvm_ffi.Shape([pos]), *self._weights)
        first = out[0] if not isinstance(out, tvm.runtime.Tensor) else out
        return first.numpy()

    def _feeds(self, entry: str, ids: list[int], pos: int, last: int) -> dict[str, np.ndarray]:
        """Inputs by role: token ids, positions, and the last-token index (names as the export gives them)."""
        feeds = {}
        for sig in self.entries[entry]["inputs"]:
            name, shape = sig["name"], sig["shape"]
            if "position" in name:
                feeds[name] = (pos + np.arange(int(np.prod(shape)))).reshape(shape).astype(sig["dtype"])
            elif "index" in name or "last" in name:
                feeds[name] = np.full(shape, last, dtype=sig["dtype"])
            elif "mask" in name:
                feeds[name] = np.ones(shape, dtype=sig["dtype"])
            else:
                padded = np.zeros(int(np.prod(shape)), dtype=sig["dtype"])
                padded[: len(ids)] = ids
                feeds[name] = padded.reshape(shape)
        return feeds

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Process a prompt from position 0; returns the logits of its last token."""
        if not ids:
            raise EdgeccError("the prompt is empty", "give at least one token")
        self._check_ids(ids)
        if len(ids) > self.max_context - 1:
            raise EdgeccError(f"the prompt has {len(ids)} tokens, the artifact's --max-context is {self.max_context}",
                              f"shorten the prompt, or rebuild with --max-context > {len(ids)}")
        self.position = 0
        logits = None
        if self.prefill_len:
            chunk = ids[: self.prefill_len]
            logits = self._call("prefill", self._feeds("prefill", chunk, 0, len(chunk) - 1), 0)
            self.position = len(chunk)
            rest = ids[self.prefill_len:]
        else:
            rest = ids
        for token in rest:
            logits = self.decode(token)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token at the current position; returns the next-token logits."""
        if self.position >= self.max_context:
            raise EdgeccError(f"the KV cache is full ({self.max_context} positions)",
                              "rebuild with a larger --max-context")
        self._check_ids([token])
        logits = self._call("decode", self._feeds("decode", [token], self.position, 0), self.position)
        self.position += 1
        return logits

    # ---------------------------------------------------------------------------------------------- loop

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler | None = None,
                 eos_token_id: int | None = None, on_token: Callable[[int], None] | None = None):
        """-> (new token ids, GenerationStats). Stops at EOS, `max_new_tokens`, or a full cache."""
        sampler = sampler or Sampler()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits = self.prefill(list(prompt_ids))
        out: list[int] = []
        t_first = None
        while True:
            token = sampler(logits)
            out.append(token)
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and token == eos_token_id:
                stats.stopped = "eos"
                break
            if len(out) >= max_new_tokens:
                stats.stopped = "max_new_tokens"
                break
            if self.position >= self.max_context:
                stats.stopped = "max_context"
                break
            logits = self.decode(token)
        stats.new_tokens = len(out)
        stats.decode_s = time.perf_counter() - t_first
        stats.peak_rss_bytes = peak_rss_bytes()
        return out, stats
