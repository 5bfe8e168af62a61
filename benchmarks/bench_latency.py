#!/usr/bin/env python
"""Latency of edgecc vs onnxruntime on the same ONNX model, measured in one run.

    python benchmarks/bench_latency.py                      # MiniLM (all-MiniLM-L6-v2), seq 128, host
    python benchmarks/bench_latency.py --zoo resnet50-rw    # any `edgecc models list` name or light-model name
    python benchmarks/bench_latency.py --model m.onnx --dim batch=1 --iters 100
    python benchmarks/bench_latency.py --quantize w8a8 --ort-quantize dynamic   # int8 vs onnxruntime's int8

How it measures (see benchmarks/README.md for why):

* each runtime lives in its own worker process (multiprocessing "spawn"), so neither one's thread pool,
  allocator or import side effects touch the other;
* the parent drives the workers in strict alternation (A, B, A, B, ...) with a short sleep between calls,
  first ``--warmup`` rounds, then ``--iters`` timed rounds; each worker times only its own call
  (``time.perf_counter_ns`` around ``m.run(feeds)`` / ``session.run(None, feeds)``, both dict of numpy in,
  numpy out), so pipe latency is not counted;
* edgecc runs with ``TVM_NUM_THREADS`` (default: the number of cores this process may use; printed);
  onnxruntime keeps its default threading (``intra_op_num_threads=0``), which on this kind of machine is the
  stable setting (an explicit thread count was bimodal and slower when another runtime shares the cores);
* before timing, both runtimes' outputs on the same feeds are compared (max abs diff is printed).

Runtimes: ``edgecc`` (``edgecc.build.build_artifact`` + ``edgecc.runtime_bridge.host.load_artifact``),
``onnxruntime``, and ``tvm`` (TVM's ONNX importer + ``tvm.compile`` for llvm with the host CPU, no edgecc
passes: the unscheduled baseline). ``--runtimes`` picks which (default ``edgecc,onnxruntime``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------ workers
# Each class has the same small interface: __init__(onnx_path, workdir, options) prepares the model,
# `info` says what it runs with, run(feeds) -> {name: array}.


class EdgeccRunner:
    name = "edgecc"

    def __init__(self, onnx_path: str, workdir: str, options: dict):
        from edgecc.runtime_bridge.host import load_artifact

        artifact = options.get("artifact")
        t0 = time.perf_counter()
        if not artifact:
            from edgecc.build import build_artifact

            artifact = os.path.join(workdir, "edgecc_artifact")
            build_artifact(onnx_path, artifact, target=options.get("target", "host"), quantize=options.get("quantize"))
        build_s = time.perf_counter() - t0
        self.model = load_artifact(artifact)
        if getattr(self.model, "emulated", False):
            raise RuntimeError(f"the artifact is for {self.model.arch} and would run under qemu: timing it is meaningless")
        threads = getattr(self.model, "num_threads", None) or os.environ.get("TVM_NUM_THREADS")
        self.info = {
            "threads": f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')} (runtime uses {threads})",
            "build_s": round(build_s, 1),
            "artifact": artifact,
            "target": options.get("target", "host"),
        }

    def run(self, feeds):
        return self.model.run(feeds)


class TvmRunner:
    """Plain TVM: ONNX importer + default tvm.compile pipeline; the baseline edgecc's passes are measured against."""

    name = "tvm"

    def __init__(self, onnx_path: str, workdir: str, options: dict):
        import onnx
        import tvm
        import tvm.relax.frontend.onnx  # noqa: F401  (registers relax.frontend.onnx)
        from tvm import relax

        t0 = time.perf_counter()
        model = onnx.load(onnx_path)
        inits = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        mod = relax.frontend.onnx.from_onnx(model, shape_dict=options.get("shapes"), keep_params_in_input=False)
        target = tvm.target.Target.from_device(tvm.cpu())
        executable = tvm.compile(mod, target=target)
        build_s = time.perf_counter() - t0
        n = int(os.environ.get("TVM_NUM_THREADS", "0") or 0)
        if n > 0:
            import tvm_ffi

            tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self.dev = tvm.cpu()
        self.info = {
            "threads": f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}",
            "build_s": round(build_s, 1),
            "target": str(target.attrs.get("mcpu", "llvm")),
        }

    def run(self, feeds):
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), self.dev) for n in self.input_names]
        out = self.vm["main"](*args)
        flat = []

        def walk(x):
            if isinstance(x, tvm.runtime.Tensor):
                flat.append(x.numpy())
            else:
                for item in x:
                    walk(item)

        walk(out)
        return dict(zip(self.output_names, flat))


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, onnx_path: str, workdir: str, options: dict):
        import onnxruntime as ort

        t0 = time.perf_counter()
        so = ort.SessionOptions()  # default threading on purpose: intra_op_num_threads=0
        so.log_severity_level = 3
        if options.get("ort_threads"):  # for thread-scaling comparisons (--ort-threads 1 with --threads 1)
            so.intra_op_num_threads = int(options["ort_threads"])
        if options.get("ort_quantize") == "dynamic":  # onnxruntime's own int8: weights per channel, activations dynamic
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = os.path.join(workdir, "ort_dynamic_int8.onnx")
            if not os.path.exists(quantized):
                quantize_dynamic(onnx_path, quantized, per_channel=True, weight_type=QuantType.QInt8)
            onnx_path = quantized
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        try:
            import psutil

            physical = psutil.cpu_count(logical=False)
        except Exception:  # noqa: BLE001
            physical = None
        self.info = {
            "threads": (f"intra_op_num_threads={so.intra_op_num_threads}" if options.get("ort_threads") else
                        f"default (intra_op_num_threads={so.intra_op_num_threads}: one per physical core"
                        + (f", {physical} here)" if physical else ")")),
            "build_s": round(time.perf_counter() - t0, 1),
            "version": ort.__version__,
        }

    def run(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))


RUNNERS = {"edgecc": EdgeccRunner, "onnxruntime": OrtRunner, "tvm": TvmRunner}


def _answer(runner, feeds, msg):
    """A worker's reply to 'time' (ms of one call) or 'outputs' (numpy arrays); anything else: 'bye'."""
    if msg == "time":
        t0 = time.perf_counter_ns()
        runner.run(feeds)
        return (time.perf_counter_ns() - t0) / 1e6
    if msg == "outputs":
        return {k: np.asarray(v) for k, v in runner.run(feeds).items()}
    return "bye"


def _worker(kind: str, onnx_path: str, feeds_path: str, workdir: str, options: dict, env: dict, conn) -> None:
    """Worker process main loop: set up, then answer 'time' / 'outputs' / 'stop' requests."""
    os.environ.update(env)  # before any TVM import: TVM reads TVM_NUM_THREADS when its pool starts
    sys.path.insert(0, str(REPO))
    try:
        with np.load(feeds_path) as data:
            feeds = {k: data[k] for k in data.files}
        runner = RUNNERS[kind](onnx_path, workdir, options)
        conn.send(("ready", runner.info))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
        return
    while True:
        msg = conn.recv()
        try:
            conn.send(("ok", _answer(runner, feeds, msg)))
            if msg not in ("time", "outputs"):
                return
        except Exception as exc:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class Worker:
    def __init__(self, ctx, kind, onnx_path, feeds_path, workdir, options, env, target=None):
        """`target`: the worker process's main loop (default `_worker`; profile_vs_ort.py brings its own)."""
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=target or _worker, args=(kind, onnx_path, feeds_path, workdir, options, env, child), daemon=True
        )
        self.proc.start()
        child.close()

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.kind} worker died while setting up (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} worker not ready after {timeout:.0f} s")
        status, payload = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"{self.kind} worker failed to set up:\n{payload}")
        self.info = payload
        return payload

    def call(self, msg):
        try:
            self.conn.send(msg)
            status, payload = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            raise RuntimeError(f"{self.kind} worker died (exit code {self.proc.exitcode})") from exc
        if status != "ok":
            raise RuntimeError(f"{self.kind} worker failed on {msg!r}:\n{payload}")
        return payload

    def stop(self):
        try:
            if self.proc.is_alive():
                self.conn.send("stop")
                self.conn.poll(10) and self.conn.recv()
        except (BrokenPipeError, EOFError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


class InProcessWorker:
    """A runner in this process, behind `Worker`'s interface (`--same-process`). Valid single-threaded only:
    there neither runtime keeps a thread pool that spins after a call (two 2-thread runtimes in one process
    spin against each other and ran 2x slower), and both see the same machine state call by call, which
    made the edgecc/onnxruntime ratio of the least noisy of this machine's measurements (per-round spread ~2%
    where separate 2-thread processes swing 0.92-1.2x within minutes)."""

    def __init__(self, kind, onnx_path, feeds, workdir, options):
        self.kind = kind
        self._setup = (onnx_path, workdir, options)
        self._feeds = feeds
        self.runner = None
        self.info = None

    def wait_ready(self, timeout: float):
        try:
            self.runner = RUNNERS[self.kind](*self._setup)
        except Exception as exc:  # noqa: BLE001 - reported like a worker's failure
            raise RuntimeError(f"{self.kind} failed to set up: {type(exc).__name__}: {exc}") from exc
        self.info = self.runner.info
        return self.info

    def call(self, msg):
        return _answer(self.runner, self._feeds, msg)

    def stop(self):
        self.runner = None


# ------------------------------------------------------------------------------------------------ model + feeds


def _parse_dims(items):
    dims = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--dim wants NAME=INT, got {item!r}")
        dims[key] = int(value)
    return dims


def _feeds_from_signature(onnx_path: Path, dims: dict, seed: int):
    """Random feeds for an arbitrary ONNX file: float inputs ~ U[0,1), integer inputs 0 (ids/masks safe)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds, shapes = {}, {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                print(f"note: input {vi.name!r} dim {d.dim_param!r} is symbolic; using 1 (set --dim)")
                shape.append(1)
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.random(shape).astype(dtype)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
        shapes[vi.name] = shape
    return feeds, shapes


def prepare_model(args, workdir: Path):
    """-> (onnx path, feeds, description)."""
    if args.model:
        path = Path(args.model).resolve()
        feeds, _ = _feeds_from_signature(path, _parse_dims(args.dim), args.seed)
        return path, feeds, f"{path.name} (given file)"
    from edgecc.models import registry

    name = args.zoo or f"minilm-seq{args.seq_len}"
    if name == "minilm-seq128":
        name = "minilm"
    key = name.replace("_", "-")
    if key not in registry.MODELS and name.startswith("minilm-seq"):
        from edgecc.models import minilm

        path = minilm.export_minilm(workdir / f"{name}.onnx", seq_len=args.seq_len)
        return path, minilm.default_feeds(args.seq_len, args.seed), f"{name} (exported to {path.parent})"
    if key not in registry.MODELS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(registry.MODELS)}")
    entry = registry.MODELS[key]
    t0 = time.perf_counter()
    path = entry.export(workdir / f"{key}.onnx")
    print(f"exported {key} in {time.perf_counter() - t0:.1f} s -> {path}")
    return path, entry.feeds(seed=args.seed), f"{key}: {entry.description}"


# ------------------------------------------------------------------------------------------------ stats + main


def _pct(values, q):
    return float(np.percentile(np.asarray(values), q))


def summarize(times: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times),
        "p10_ms": _pct(times, 10),
        "p90_ms": _pct(times, 90),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "n": len(times),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="an ONNX file to benchmark")
    src.add_argument("--zoo", help="a model by name: any `edgecc models list` name (resnet50, resnet50-rw, tiny-cnn...)")
    ap.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length when no model is given")
    ap.add_argument("--dim", action="append", help="NAME=INT for symbolic input dims of --model files")
    ap.add_argument("--target", default="host", help="edgecc target (default host; timings only mean much there)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per runtime")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per runtime first")
    ap.add_argument("--pause", type=float, default=0.2,
                    help="seconds between calls (lets onnxruntime's spinning workers settle; 0.05 was too short)")
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS for edgecc/tvm (default: cores)")
    ap.add_argument("--ort-threads", type=int, default=0,
                    help="onnxruntime intra_op_num_threads (default 0: its own default; 1 with --threads 1 compares "
                         "single-thread speed)")
    ap.add_argument("--runtimes", default="edgecc,onnxruntime", help="comma list of: " + ", ".join(RUNNERS))
    ap.add_argument("--artifact", help="reuse an already built edgecc artifact directory (skip the build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", default=None, help="edgecc: build with --quantize SCHEME (e.g. w8a8, w8)")
    ap.add_argument("--ort-quantize", choices=["dynamic"], default=None,
                    help="onnxruntime: run its quantize_dynamic (int8, per-channel) version of the model instead")
    ap.add_argument("--setup-timeout", type=float, default=3600, help="seconds a worker may take to build/load")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--same-process", action="store_true",
                    help="run both runtimes in this process, calls alternating (needs --threads 1 --ort-threads 1: "
                         "thread pools that spin after a call would slow each other); steadier ratios, "
                         "single-thread speed only")
    args = ap.parse_args(argv)

    kinds = [k.strip() for k in args.runtimes.split(",") if k.strip()]
    bad = [k for k in kinds if k not in RUNNERS]
    if bad or not kinds:
        raise SystemExit(f"unknown runtime(s) {bad}; choose from {list(RUNNERS)}")
    if "edgecc" in kinds and not args.artifact and not (REPO / "edgecc" / "build.py").exists():
        raise SystemExit("edgecc/build.py is missing; run with --runtimes tvm,onnxruntime for the plain-TVM baseline")

    threads = args.threads or int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or _cores()
    if args.same_process and (threads != 1 or args.ort_threads != 1):
        raise SystemExit("--same-process compares single-threaded speed: add --threads 1 --ort-threads 1 "
                         "(2-thread runtimes in one process spin against each other)")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="edgecc_bench_") as tmp:
        workdir = Path(tmp)
        onnx_path, feeds, desc = prepare_model(args, workdir)
        feeds_path = workdir / "feeds.npz"
        np.savez(feeds_path, **feeds)

        print(f"model    : {desc}")
        print("inputs   : " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in feeds.items()))
        print(f"machine  : {platform.machine()}, {_cores()} usable cores, load avg {os.getloadavg()[0]:.2f}")

        ctx = mp.get_context("spawn")
        env = {"TVM_NUM_THREADS": str(threads)}
        options = {"target": args.target, "artifact": args.artifact, "shapes": {k: list(v.shape) for k, v in feeds.items()},
                   "quantize": args.quantize, "ort_quantize": args.ort_quantize, "ort_threads": args.ort_threads}
        if args.same_process:
            os.environ.update(env)  # before this process starts TVM's pool
        workers = []
        try:
            # Set up one at a time: builds are heavy, and the other worker's import should not slow them.
            for kind in kinds:
                if args.same_process:
                    w = InProcessWorker(kind, str(onnx_path), feeds, str(workdir), options)
                else:
                    w = Worker(ctx, kind, str(onnx_path), str(feeds_path), str(workdir), options, env)
                workers.append(w)
                info = w.wait_ready(args.setup_timeout)
                print(f"{kind:<12} ready: " + ", ".join(f"{k}={v}" for k, v in info.items()))

            outputs = {w.kind: w.call("outputs") for w in workers}
            ref_kind = "onnxruntime" if "onnxruntime" in outputs else kinds[0]
            diffs = {}
            for kind, outs in outputs.items():
                if kind == ref_kind:
                    continue
                for name, ref in outputs[ref_kind].items():
                    got = outs.get(name)
                    if got is None or got.shape != ref.shape:
                        diffs[f"{kind}:{name}"] = "shape mismatch" if got is not None else "missing"
                    else:
                        diffs[f"{kind}:{name}"] = float(np.abs(got.astype(np.float64) - ref).max())
            for key, value in diffs.items():
                print(f"check    : {key} max |diff| vs {ref_kind} = {value if isinstance(value, str) else f'{value:.3g}'}")

            for _ in range(args.warmup):
                for w in workers:
                    w.call("time")
                    time.sleep(args.pause)
            times = {w.kind: [] for w in workers}
            load_before = os.getloadavg()[0]
            for _ in range(args.iters):
                for w in workers:
                    times[w.kind].append(w.call("time"))
                    time.sleep(args.pause)
            load_after = os.getloadavg()[0]
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            for w in workers:
                w.stop()

    stats = {k: summarize(v) for k, v in times.items()}
    where = "in this one process" if args.same_process else "each runtime in its own process"
    print(f"\n{args.iters} timed calls each, alternating, {where}, {args.pause * 1000:.0f} ms pause; "
          f"load avg {load_before:.2f} -> {load_after:.2f}")
    print(f"{'runtime':<12} {'median ms':>10} {'p10':>9} {'p90':>9} {'min':>9}  threads")
    for w in workers:
        s = stats[w.kind]
        print(f"{w.kind:<12} {s['median_ms']:>10.3f} {s['p10_ms']:>9.3f} {s['p90_ms']:>9.3f} {s['min_ms']:>9.3f}  "
              f"{w.info['threads']}")
    result = {"model": desc, "iters": args.iters, "pause_s": args.pause, "stats": stats, "check": diffs,
              "same_process": bool(args.same_process),
              "threads": {w.kind: w.info["threads"] for w in workers},
              "load_avg": [load_before, load_after], "raw_ms": times}
    if "edgecc" in stats and "onnxruntime" in stats:
        ratio = stats["edgecc"]["median_ms"] / stats["onnxruntime"]["median_ms"]
        paired = statistics.median(a / b for a, b in zip(times["edgecc"], times["onnxruntime"]))
        result["ratio_edgecc_over_onnxruntime"] = {"of_medians": ratio, "median_of_paired": paired}
        print(f"ratio edgecc/onnxruntime: {ratio:.2f}x (median of per-round ratios {paired:.2f}x; >1 = edgecc slower)")
    if "tvm" in stats and "edgecc" in stats:
        ratio = stats["edgecc"]["median_ms"] / stats["tvm"]["median_ms"]
        result["ratio_edgecc_over_tvm"] = ratio
        print(f"ratio edgecc/plain tvm : {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
