"""Load an artifact and run it from this Python process.

An artifact for this machine runs in-process on TVM's Relax VM. One for another architecture (arm-neon,
riscv64-rvv, ...) runs under qemu-user through `emulated.run_emulated`, so `edgecc run` and `edgecc verify`
behave the same for every target. Inputs are checked against the manifest's signature first: a wrong name,
shape or dtype is the user's mistake and gets a one-line error, never a VM crash.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.frontend.signature import Signature
from edgecc.runtime_bridge import artifact as art
from edgecc.runtime_bridge.params_file import read_params
from edgecc.runtime_bridge.weight_memory import load_weights
from edgecc.targets.registry import host_cpu_flags


def default_num_threads() -> int:
    """Threads for TVM's pool: $TVM_NUM_THREADS, else every core (TVM alone would use half of them here)."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Size TVM's thread pool to `n` threads, unpinned unless $TVM_BIND_THREADS says otherwise.

    TVM pins its pool threads (and the calling thread) to cores by default. On a shared or
    time-sliced machine a pinned thread woken after a long idle wait (an app waiting for input
    between decode steps) has to wait for its one core: measured here, a decode step woken from a
    200 ms pipe read took 15-16 ms pinned and 9-10 ms unpinned, the same as back-to-back steps.
    The pool is rebuilt by the call below, which reads the variable.

    TVM sizes its pool once, when it is first used, from $TVM_NUM_THREADS, else half the cores (it assumes
    SMT: one thread on this 2-core machine), and `config_threadpool` can only use fewer workers than that,
    never more. So the variable is set to `n` first: measured, a 2-thread read kernel ran at 8.9 GB/s after
    `config_threadpool(1, 2)` alone (one worker, as with 1 thread) and 17.6 GB/s with the variable set. A pool
    already created with fewer workers (another model loaded earlier in this process) cannot grow.
    """
    import tvm  # noqa: F401 - loads the runtime library that registers config_threadpool
    import tvm_ffi

    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    # mode 1 = "little"/any cores; the second argument is the thread count.
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str):
    """numpy's dtype for a signature dtype name, or None (bfloat16, float8: numpy has none). Comparing dtypes
    costs ~0.1 us where str(dtype) costs ~6 us, per input and call (a decode step has 26 inputs)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def check_feeds(signature: Signature, feeds: dict[str, np.ndarray],
                index_bounds: dict[str, int] | None = None) -> list[np.ndarray]:
    """Match user inputs to the built signature, in order; raise EdgeccError on any mismatch.

    `index_bounds` (input -> table size) catches indices the compiled gather would read out of bounds.
    """
    expected = {t.name: t for t in signature.inputs}
    unknown = [k for k in feeds if k not in expected]
    if unknown:
        raise EdgeccError(f"unknown input name(s) {', '.join(repr(u) for u in unknown)}",
                          "the model's inputs are: " + ", ".join(expected))
    ordered = []
    for sig in signature.inputs:
        if sig.name not in feeds:
            raise EdgeccError(f"input '{sig.name}' is missing",
                              f"give it as {sig.dtype} with shape {list(sig.shape)}")
        value = np.asarray(feeds[sig.name])
        known = _numpy_dtype(sig.dtype)  # (never compare a dtype with None: numpy reads None as float64)
        if (value.dtype != known) if known is not None else (str(value.dtype) != sig.dtype):
            raise EdgeccError(f"input '{sig.name}' has dtype {value.dtype}, the model takes {sig.dtype}",
                              f"cast it, e.g. x.astype('{sig.dtype}')")
        if tuple(value.shape) != tuple(sig.shape):
            raise EdgeccError(f"input '{sig.name}' has shape {list(value.shape)}, this build takes {list(sig.shape)}",
                              "reshape the input, or rebuild with matching --dim sizes")
        bound = (index_bounds or {}).get(sig.name)
        if bound is not None and value.size and (value.min() < -bound or value.max() >= bound):
            raise EdgeccError(f"input '{sig.name}' has values in [{value.min()}, {value.max()}], outside the "
                              f"table it indexes (size {bound})", f"keep its values in [0, {bound - 1}]")
        ordered.append(np.require(value, requirements="C"))  # keeps 0-d inputs 0-d
    return ordered


class InputTensors:
    """The VM's input tensors for one call: numpy's own buffer (zero-copy) when TVM accepts it, else a copy
    into a tensor kept from the previous call.

    Why: a decode step's inputs include the whole past KV cache; a fresh tensor per input and a fresh numpy
    array per output made a GPT-2 decode step 10-15% slower (one process, old vs new I/O alternating), and
    the copy itself is about a tenth of the step. Kernels built by edgecc read their inputs with unaligned
    loads (`ir_passes/unaligned_inputs`, manifest `input_alignment: "element"`), so any C-contiguous,
    writable array goes in as it is (numpy does not export read-only arrays); artifacts without that (older
    ones, and models whose inputs reach a vendor library) need 64-byte alignment, which numpy's 16-byte
    aligned arrays rarely have. The model only reads its inputs."""

    def __init__(self, dev, any_alignment: bool = False):
        import tvm

        self._dev = dev
        self._on_cpu = dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self._alignment = 0 if any_alignment else 64  # bytes the kernels assume of an input's address
        self._kept: dict[int, tuple] = {}  # input index -> (tensor, its numpy view or None)

    def __call__(self, inputs: list[np.ndarray]) -> list:
        import tvm
        import tvm_ffi

        args = []
        for i, x in enumerate(inputs):
            if (self._on_cpu and x.size and x.flags.c_contiguous
                    and x.ctypes.data % (self._alignment or x.itemsize or 1) == 0):
                try:
                    args.append(tvm_ffi.from_dlpack(x, require_alignment=self._alignment))
                    continue
                except (BufferError, RuntimeError, TypeError, ValueError):  # read-only, or a dtype DLPack lacks
                    pass
            kept, view = self._kept.get(i, (None, None))
            if kept is None or tuple(kept.shape) != x.shape or str(kept.dtype) != str(x.dtype):
                kept = tvm.runtime.empty(x.shape, str(x.dtype), self._dev)
                view = _numpy_view(kept) if self._on_cpu else None
                self._kept[i] = (kept, view)
            if view is not None and view.dtype == x.dtype:
                # numpy's copy into the tensor's memory: 1.31 -> 1.0 ms for a GPT decode step's 4.7 MB of past
                # KV (cold), 28 -> 16 us for one 393 KB input (warm), against `copyfrom`
                np.copyto(view, x)
            else:
                kept.copyfrom(np.ascontiguousarray(x))
            args.append(kept)
        return args


def _numpy_view(tensor):
    """A writable numpy view of a CPU tensor's memory, or None (a dtype numpy's DLPack lacks)."""
    try:
        return np.from_dlpack(tensor)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _bytes_per_element(dtype) -> int:
    import tvm

    dt = tvm.runtime.DataType(str(dtype))
    return (dt.bits * dt.lanes + 7) // 8


def _span(t) -> tuple[int, int]:
    """[first byte, one past the last) of a TVM tensor's data (any dtype, also those numpy lacks)."""
    ptr = t.data_ptr()
    return ptr, ptr + t.numel() * _bytes_per_element(t.dtype)


class OutputViews:
    """Outputs as numpy views of the VM's own output tensors (no copy), except where a view could alias
    memory the caller must not write to: a weight, an input, or another output (those are copied)."""

    def __init__(self, weights: list):
        spans = sorted(sp for sp in (_span(w) for w in weights) if sp[1] > sp[0])
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]

    def _in_weights(self, ptr: int) -> bool:
        import bisect

        i = bisect.bisect_right(self._starts, ptr) - 1
        return i >= 0 and ptr < self._ends[i]

    def __call__(self, outputs: list, inputs: list) -> list[np.ndarray]:
        taken = [sp for sp in (_span(t) for t in inputs) if sp[1] > sp[0]]  # inputs, then outputs handed out
        arrays = []
        for t in outputs:
            start, end = _span(t)
            shared = end > start and (self._in_weights(start) or any(s < end and start < e for s, e in taken))
            try:
                view = np.from_dlpack(t)
            except (BufferError, RuntimeError, TypeError, ValueError):  # a dtype numpy's DLPack lacks
                arrays.append(t.numpy())
                continue
            arrays.append(view.copy() if shared else view)
            if not shared:
                taken.append((start, end))
        return arrays


def _flatten(result) -> list:
    import tvm

    if isinstance(result, tvm.runtime.Tensor):
        return [result]
    out = []
    for item in result:
        out.extend(_flatten(item))
    return out


class LoadedArtifact:
    """A built model, ready to run. `run(feeds)` -> {output name: array}."""

    def __init__(self, artifact_dir: str | Path, num_threads: int | None = None):
        self.dir = Path(artifact_dir)
        self.manifest = art.read_manifest(self.dir)
        if self.manifest.get("llm"):
            raise EdgeccError(f"'{self.dir}' is a decoder with a KV cache (entry points prefill/decode), not a "
                              "single-call model", f"use `edgecc generate {self.dir} --prompt ...`")
        art.verify_file_hashes(self.dir, self.manifest)
        self.signature = Signature.from_json(self.manifest["signature"]["built"])
        self.index_bounds = self.manifest["signature"].get("index_bounds", {})
        self.target_name = self.manifest["target"]["name"]
        self.arch = self.manifest["target"]["arch"]
        self.device = self.manifest["target"].get("device", "cpu")
        self.emulated = self.device == "cpu" and self.arch != platform.machine()
        self.num_threads = num_threads or default_num_threads()
        self._vm = None
        self._weights = None

    def _load_native(self):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: runs on a runtime-only TVM too

        if self.device == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise EdgeccError(f"artifact '{self.dir}' is for CUDA and this machine has no GPU",
                                  "run it on a machine with an NVIDIA GPU")
        else:
            lacking = [f for f in self.manifest["target"]["features"] if self.arch == "x86_64"
                       and f not in host_cpu_flags()]
            if lacking:
                raise EdgeccError(f"artifact '{self.dir}' was built for target '{self.target_name}', whose code "
                                  f"needs {', '.join(lacking)}, which this CPU lacks",
                                  "run it on a CPU with those features, or rebuild with -t host")
            dev = tvm.cpu()
            set_num_threads(self.num_threads)
        self._vm = VirtualMachine(art.load_library(self.dir), dev)
        self._dev = dev
        self._arena = load_weights([w for _, w in read_params(self.dir / art.PARAMS)], dev)
        self._weights = self._arena.tensors
        self._output_views = OutputViews(self._weights) if self.device == "cpu" else None
        self._inputs = InputTensors(dev, self.manifest["signature"].get("input_alignment") == "element")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = check_feeds(self.signature, feeds, self.index_bounds)
        if self.emulated:
            from edgecc.runtime_bridge.emulated import run_emulated
            from edgecc.targets.registry import get_target

            outs = run_emulated(self.dir, get_target(self.target_name), inputs, self.manifest.get("entry", "main"))
        else:
            outs = self._run_native(inputs)
        names = [t.name for t in self.signature.outputs]
        if len(outs) != len(names):
            raise RuntimeError(f"model returned {len(outs)} outputs, signature has {len(names)}")
        return dict(zip(names, outs))

    def _run_native(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self._vm is None:
            self._load_native()
        args = self._inputs(inputs)
        result = self._vm[self.manifest.get("entry", "main")](*args, *self._weights)
        if self._output_views is None:
            return [t.numpy() for t in _flatten(result)]
        return self._output_views(_flatten(result), args)

    def time_run(self, feeds: dict[str, np.ndarray]):
        """Prepare once and return a zero-argument callable that runs the model (for benchmarks)."""
        import tvm

        inputs = check_feeds(self.signature, feeds, self.index_bounds)
        if self.emulated:
            raise EdgeccError("timing an emulated artifact measures qemu, not the target",
                              "benchmark on the real board")
        if self._vm is None:
            self._load_native()
        args = [tvm.runtime.tensor(x, self._dev) for x in inputs]
        func = self._vm[self.manifest.get("entry", "main")]
        return lambda: func(*args, *self._weights)


def load_artifact(artifact_dir: str | Path, num_threads: int | None = None) -> LoadedArtifact:
    return LoadedArtifact(artifact_dir, num_threads)
