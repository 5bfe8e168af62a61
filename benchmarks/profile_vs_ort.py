#!/usr/bin/env python
"""Where edgecc and onnxruntime differ, kernel group by kernel group, on the same ONNX model in one run.

    python benchmarks/profile_vs_ort.py --zoo resnet50-rw
    python benchmarks/profile_vs_ort.py --model m.onnx --rounds 8 --runs 3 --top 15

`bench_latency.py` says *whether* edgecc is slower than onnxruntime on a model; this says *where*. Timing one
kernel on its own (`profile_kernels.py`, one-op ONNX files) misses what happens in sequence: weights that come
cold from DRAM, the previous op's output still in cache, thread wake-ups. So both runtimes are profiled while
running the whole model, in the same way `bench_latency.py` times them:

* each runtime in its own worker process (onnxruntime's spinning threads slow any other runtime in its
  process); the parent alternates them: ``--rounds`` rounds of ``--runs`` profiled model runs each;
* edgecc: the Relax VM's call instrument (`vm.set_instrument`) takes a timestamp just before and just after
  every compiled-kernel call of the artifact's entry function (builtins such as reshape views are not timed);
* onnxruntime: its own profiler (`SessionOptions.enable_profiling`), one event per node and run.

Profiling costs time on both sides, and not the same: each edgecc kernel call goes through two Python
callbacks (a few microseconds each), and onnxruntime's profiler slows its nodes (10-15% here). So each
runtime's whole run is also timed unprofiled, in the same rounds (edgecc: a second, uninstrumented load of
the artifact in its worker; onnxruntime: a third worker, since two sessions in one process spin against each
other), and the summary prints both: per-kernel ratios near 1 mean little when the profilers' costs differ.

The two graphs are not the same graph (edgecc fuses epilogues into kernels, onnxruntime converts CNNs to its
NCHWc layout and adds reorder nodes), so kernels are matched by **what they produce**: a group is a kind
(conv/gemm, pool, layout, other) and the number of output elements. Per group the table gives the median over
runs of the summed time per model run on each side, the ratio and the difference; rows are sorted by how much
more time edgecc spends. Both profilers add a little time per call (a few microseconds), so the whole-run
medians printed below the table are profiled runs, not benchmark figures: use `bench_latency.py` for those.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_latency import Worker, _cores, prepare_model  # noqa: E402

# onnxruntime op types and edgecc kernel names -> a kind both sides share
_ORT_KINDS = {
    "Conv": "conv/gemm", "FusedConv": "conv/gemm", "Gemm": "conv/gemm", "MatMul": "conv/gemm",
    "FusedMatMul": "conv/gemm", "QLinearConv": "conv/gemm", "ConvInteger": "conv/gemm", "MatMulInteger": "conv/gemm",
    "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool", "GlobalMaxPool": "pool",
    "ReorderInput": "layout", "ReorderOutput": "layout", "Transpose": "layout", "Reshape": "layout",
}
_EDGECC_KINDS = [
    (re.compile(r"conv|matmul|dense|gemm|einsum|gemv|linear|attention"), "conv/gemm"),
    (re.compile(r"pool|adaptive_avg|mean"), "pool"),
    (re.compile(r"transpose|layout_transform|reshape"), "layout"),
]


def edgecc_kind(kernel_name: str) -> str:
    name = kernel_name.lower()
    for pattern, kind in _EDGECC_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def ort_kind(op_type: str) -> str:
    return _ORT_KINDS.get(op_type, "other")


# ------------------------------------------------------------------------------------------------ profilers


class EdgeccProfiler:
    """Build (or load) the artifact, then time every kernel call of the entry function in sequence."""

    name = "edgecc"

    def __init__(self, onnx_path: str, workdir: str, options: dict):
        import tvm_ffi

        from edgecc.runtime_bridge.host import load_artifact

        artifact = options.get("artifact")
        if not artifact:
            from edgecc.build import build_artifact

            artifact = os.path.join(workdir, "edgecc_artifact")
            build_artifact(onnx_path, artifact, target=options.get("target", "host"))
        self.model = load_artifact(artifact)
        self.plain = load_artifact(artifact)  # the same artifact without the instrument: the profiling overhead
        self.runs: list[list[tuple[str, int, float]]] = []
        self._current: list[tuple[str, int, float]] | None = None
        self._t0 = 0.0

        def instrument(func, symbol, before_run, ret_value, *call_args):
            if self._current is None or symbol.startswith("vm.") or not call_args:
                return 0
            if before_run:
                self._t0 = time.perf_counter()
            else:
                dt = time.perf_counter() - self._t0
                out = call_args[-1]  # call_tir / DPS: the output is the last argument
                numel = int(np.prod([int(d) for d in out.shape])) if hasattr(out, "shape") else 0
                self._current.append((str(symbol), numel, dt * 1e3))
            return 0  # VMInstrumentReturnKind.kNoOp: the VM makes the call as usual

        self._instrument = tvm_ffi.convert(instrument)
        self.info = {"threads": f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}", "artifact": artifact}

    def run(self, feeds):
        self.plain.run(feeds)
        return self.model.run(feeds)

    def profile(self, feeds, runs: int = 1):
        """-> {"profiled": [ms], "plain": [ms]}: whole runs with and without the instrument, alternating."""
        if self.model._vm is None:  # first call loads the library
            self.model.run(feeds)
        self.model._vm.set_instrument(self._instrument)
        whole = {"profiled": [], "plain": []}
        for _ in range(runs):
            t0 = time.perf_counter()
            self.plain.run(feeds)
            whole["plain"].append((time.perf_counter() - t0) * 1e3)
            self._current = []
            t0 = time.perf_counter()
            self.model.run(feeds)
            whole["profiled"].append((time.perf_counter() - t0) * 1e3)
            self.runs.append(self._current)
            self._current = None
        return whole

    def results(self, feeds):
        return [[(name, edgecc_kind(name), numel, ms) for name, numel, ms in run] for run in self.runs]


class OrtProfiler:
    """onnxruntime with its own node profiler on (default threading, as in bench_latency.py)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str, workdir: str, options: dict):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # one session per process: two sessions' intra-op pools spin against each other (2x slower here), so
        # the unprofiled reference runs in a worker of its own (`profiled=False`)
        self.profiled = options.get("profiled", True)
        so.enable_profiling = self.profiled
        if options.get("ort_threads"):
            so.intra_op_num_threads = int(options["ort_threads"])
        so.profile_file_prefix = os.path.join(workdir, "ort_profile")
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info = {"threads": "default", "version": ort.__version__}
        self.kept_runs = 0

    def run(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def profile(self, feeds, runs: int = 1):
        """-> {"profiled" or "plain": [ms]}: whole runs."""
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.session.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        self.kept_runs += runs
        return {"profiled" if self.profiled else "plain": times}

    def results(self, feeds):
        """Node events of the profiled runs (the last `kept_runs` model runs of the session)."""
        if not self.profiled:
            return []
        with open(self.session.end_profiling()) as f:
            events = json.load(f)
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("cat") == "Session" and e.get("name") == "SequentialExecutor::Execute")
        runs: list[list] = [[] for _ in spans]
        starts = [a for a, _ in spans]
        for ev in sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"]):
            if not ev.get("name", "").endswith("_kernel_time"):
                continue
            i = bisect.bisect_right(starts, ev["ts"]) - 1  # the model run whose span holds this node
            if i < 0 or ev["ts"] > spans[i][1]:
                continue
            args = ev.get("args", {})
            shapes = args.get("output_type_shape") or [{}]
            dims = next(iter(shapes[0].values()), [])
            numel = int(np.prod(dims)) if dims else 0
            op = args.get("op_name", "?")
            inputs = [next(iter(t.values()), []) for t in args.get("input_type_shape") or []]
            weight = "x".join(map(str, inputs[1])) if op in ("Conv", "FusedConv") and len(inputs) > 1 else ""
            label = f"{op}:{ev['name'][:-len('_kernel_time')]}" + (f":w{weight}" if weight else "")
            runs[i].append((label, ort_kind(op), numel, ev["dur"] / 1e3))
        return runs[-self.kept_runs:] if self.kept_runs else []


# ------------------------------------------------------------------------------------------------ worker


def _worker(kind: str, onnx_path: str, feeds_path: str, workdir: str, options: dict, env: dict, conn) -> None:
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    try:
        with np.load(feeds_path) as data:
            feeds = {k: data[k] for k in data.files}
        runtime = kind.split(":")[0]  # "onnxruntime:plain": the unprofiled reference
        options = {**options, "profiled": not kind.endswith(":plain")}
        profiler = {"edgecc": EdgeccProfiler, "onnxruntime": OrtProfiler}[runtime](onnx_path, workdir, options)
        for _ in range(options.get("warmup", 3)):
            profiler.run(feeds)
        conn.send(("ready", profiler.info))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
        return
    while True:
        msg = conn.recv()
        try:
            if isinstance(msg, tuple) and msg[0] == "profile":
                conn.send(("ok", profiler.profile(feeds, msg[1])))
            elif msg == "results":
                conn.send(("ok", profiler.results(feeds)))
            else:
                conn.send(("ok", "bye"))
                return
        except Exception as exc:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


# ------------------------------------------------------------------------------------------------ tables


def group_runs(runs) -> dict[tuple[str, int], dict]:
    """[(label, kind, numel, ms)] per run -> {(kind, numel): {"ms": median over runs of the summed ms, ...}}."""
    per_run: list[dict[tuple[str, int], float]] = []
    members: dict[tuple[str, int], dict[str, int]] = {}
    for run in runs:
        sums: dict[tuple[str, int], float] = {}
        for label, kind, numel, ms in run:
            key = (kind, numel)
            sums[key] = sums.get(key, 0.0) + ms
            members.setdefault(key, {})
            members[key][label] = members[key].get(label, 0) + 1
        per_run.append(sums)
    keys = {k for sums in per_run for k in sums}
    out = {}
    for key in keys:
        out[key] = {
            "ms": statistics.median(s.get(key, 0.0) for s in per_run),
            "calls": sum(members[key].values()) // max(len(per_run), 1),
            "members": members[key],
        }
    return out


def _shorten(members: dict[str, int], width: int) -> str:
    names = sorted({re.sub(r"\d+$", "", m.split(":")[0]) for m in members})
    text = ",".join(names)
    return text if len(text) <= width else text[: width - 3] + "..."


def print_table(ours: dict, theirs: dict, top: int) -> None:
    keys = sorted(set(ours) | set(theirs), key=lambda k: -(ours.get(k, {}).get("ms", 0) - theirs.get(k, {}).get("ms", 0)))
    print(f"{'kind':10s} {'out elems':>10s} {'edgecc ms':>10s} {'n':>3s} {'ort ms':>8s} {'n':>3s} {'ratio':>6s} "
          f"{'diff ms':>8s}  edgecc kernels / onnxruntime ops")
    shown = keys if top <= 0 else keys[:top]
    for key in shown:
        a, b = ours.get(key, {"ms": 0.0, "calls": 0, "members": {}}), theirs.get(key, {"ms": 0.0, "calls": 0, "members": {}})
        ratio = f"{a['ms'] / b['ms']:.2f}" if b["ms"] > 0 and a["ms"] > 0 else "-"
        print(f"{key[0]:10s} {key[1]:10d} {a['ms']:10.3f} {a['calls']:3d} {b['ms']:8.3f} {b['calls']:3d} {ratio:>6s} "
              f"{a['ms'] - b['ms']:+8.3f}  {_shorten(a['members'], 40)} / {_shorten(b['members'], 30)}")
    if len(shown) < len(keys):
        rest = keys[len(shown):]
        print(f"... {len(rest)} more groups: edgecc {sum(ours.get(k, {}).get('ms', 0) for k in rest):.3f} ms, "
              f"onnxruntime {sum(theirs.get(k, {}).get('ms', 0) for k in rest):.3f} ms")
    by_kind: dict[str, list[float]] = {}
    for key in keys:
        entry = by_kind.setdefault(key[0], [0.0, 0.0])
        entry[0] += ours.get(key, {}).get("ms", 0.0)
        entry[1] += theirs.get(key, {}).get("ms", 0.0)
    print("by kind : " + "; ".join(f"{k} {a:.2f} vs {b:.2f} ms" for k, (a, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])))


def print_sequence(runs_ours, runs_theirs, kind: str) -> None:
    """The calls of one kind side by side in execution order, when both runtimes make the same number of
    them with the same output sizes (ResNet-style CNNs: every conv is one call on each side)."""
    ours = [[c for c in run if c[1] == kind] for run in runs_ours]
    theirs = [[c for c in run if c[1] == kind] for run in runs_theirs]
    if not ours or not theirs or len(ours[0]) != len(theirs[0]) or \
            any(a[2] != b[2] for a, b in zip(ours[0], theirs[0])):
        print(f"--sequence: the {kind} calls do not pair up one to one (counts or output sizes differ)")
        return
    print(f"{'#':>3s} {'out elems':>10s} {'edgecc ms':>10s} {'ort ms':>8s} {'ratio':>6s}  edgecc kernel / onnxruntime node")
    for i, (a, b) in enumerate(zip(ours[0], theirs[0])):
        ms_a = statistics.median(run[i][3] for run in ours)
        ms_b = statistics.median(run[i][3] for run in theirs)
        print(f"{i:3d} {a[2]:10d} {ms_a:10.3f} {ms_b:8.3f} {ms_a / ms_b if ms_b else float('nan'):6.2f}  "
              f"{a[0][:44]} / {b[0]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="an ONNX file")
    src.add_argument("--zoo", help="a model by name (`edgecc models list`), e.g. resnet50-rw")
    ap.add_argument("--dim", action="append", help="NAME=INT for symbolic input dims of --model files")
    ap.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length when no model is given")
    ap.add_argument("--rounds", type=int, default=6, help="alternations between the two runtimes")
    ap.add_argument("--runs", type=int, default=3, help="profiled model runs per runtime and round")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between runtimes (their threads settle)")
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS for edgecc (default: cores)")
    ap.add_argument("--ort-threads", type=int, default=0,
                    help="onnxruntime intra_op_num_threads (default 0: its default; 1 with --threads 1: single-thread)")
    ap.add_argument("--artifact", help="an already built edgecc artifact for this model (skip the build)")
    ap.add_argument("--top", type=int, default=20, help="groups to print (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sequence", action="store_true",
                    help="also list the conv/gemm calls side by side in execution order (when they pair up)")
    ap.add_argument("--json", help="also write every profiled call of both runtimes to this JSON file")
    args = ap.parse_args(argv)
    threads = args.threads or _cores()

    with tempfile.TemporaryDirectory(prefix="edgecc_prof_vs_ort_") as tmp:
        workdir = Path(tmp)
        onnx_path, feeds, label = prepare_model(args, workdir)
        feeds_path = workdir / "feeds.npz"
        np.savez(feeds_path, **feeds)
        ctx = mp.get_context("spawn")
        env = {"TVM_NUM_THREADS": str(threads)}
        workers = [Worker(ctx, kind, str(onnx_path), str(feeds_path), str(workdir),
                          {"artifact": args.artifact, "ort_threads": args.ort_threads}, env, target=_worker)
                   for kind in ("edgecc", "onnxruntime", "onnxruntime:plain")]
        try:
            for w in workers:
                w.wait_ready(3600)
            whole = {"edgecc": {"profiled": [], "plain": []}, "onnxruntime": {"profiled": [], "plain": []}}
            for r in range(args.rounds):
                for w in (workers if r % 2 == 0 else workers[::-1]):
                    for mode, times in w.call(("profile", args.runs)).items():
                        whole[w.kind.split(":")[0]][mode] += times
                    time.sleep(args.pause)
            results = {w.kind: w.call("results") for w in workers if not w.kind.endswith(":plain")}
        finally:
            for w in workers:
                w.stop()
    ort_threads = f"intra_op_num_threads={args.ort_threads}" if args.ort_threads else "default threads"
    print(f"model {label}; edgecc TVM_NUM_THREADS={threads}, onnxruntime {ort_threads}; "
          f"{args.rounds} rounds x {args.runs} runs each, alternating; load avg {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "threads": threads, "whole_ms": whole, "runs": results}))
    ours, theirs = group_runs(results["edgecc"]), group_runs(results["onnxruntime"])
    print_table(ours, theirs, args.top)
    if args.sequence:
        print_sequence(results["edgecc"], results["onnxruntime"], "conv/gemm")
    sums = {k: statistics.median(sum(ms for *_, ms in run) for run in results[k]) for k in results}
    plain = {k: statistics.median(whole[k]["plain"]) for k in whole}
    profiled = {k: statistics.median(whole[k]["profiled"]) for k in whole}
    for kind in ("edgecc", "onnxruntime"):
        print(f"{kind:12s}: whole run {plain[kind]:.2f} ms unprofiled, {profiled[kind]:.2f} ms profiled "
              f"({100 * (profiled[kind] / plain[kind] - 1):+.0f}%: the profiler's own cost); kernels {sums[kind]:.2f} ms, "
              f"outside kernels {profiled[kind] - sums[kind]:+.2f} ms (profiled)")
    print(f"ratio of whole runs: {plain['edgecc'] / plain['onnxruntime']:.3f} unprofiled, "
          f"{profiled['edgecc'] / profiled['onnxruntime']:.3f} profiled. The per-kernel times carry each profiler's "
          f"cost: compare rows with each other, and read small ratio differences with care.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
