#!/usr/bin/env python
"""SmolLM2-135M: time to first token and decode tokens/s, edgecc vs onnxruntime vs llama.cpp, in one run.

    python benchmarks/bench_llm.py                          # exports + builds what it needs under --workdir
    python benchmarks/bench_llm.py --rounds 3 --steps 8 --contexts 128,1024 --json out.json

Runtimes (each in its own worker process, driven in strict alternation with a pause between calls):

* ``edgecc-fp32``  : `edgecc build <export> --max-context 1152` (prefill 128 + decode, in-place KV cache)
* ``edgecc-w4``    : the same with ``--quantize w4g32-asym`` (llama.cpp's Q4_1 layout: 4-bit, groups of 32, asym)
* ``edgecc-w4a8``  : ``--quantize w4g32a8-asym``: the same weights, activations on an int8 grid per group of 32 so
  decode GEMVs run on int8 dot products (llama.cpp's Q4_1 x Q8_1; onnxruntime's accuracy level 4)
* ``ort-fp32``     : onnxruntime on the same prefill/decode ONNX (KV grown by Concat, as exported)
* ``ort-int4-acc0``/``ort-int4-acc4``: onnxruntime on the graphs quantized by its MatMulNBitsQuantizer
  (4-bit, block 32, asym; accuracy level 0 = fp32 compute, 4 = int8 compute)
* ``llama.cpp``    : llama-cpp-python on the GGUF itself (Q4_1 weights, Q8_0 embedding), ``n_threads`` = cores
* ``edgecc@PATH``  : an artifact of the same export built elsewhere (e.g. `--runtimes edgecc-w4,edgecc@/tmp/w4-old`
  times a code change against the previous build in one run)

Per round and runtime: TTFT = one 128-token prompt from an empty context to its next-token logits; decode =
``--steps`` single-token steps at each context length (median per step -> tokens/s). At context C > 128
the edgecc and onnxruntime workers start the steps at position C with the cache rows already there (their
cost depends only on the position), llama.cpp evaluates a real C-token context once.

The floor is the bytes a decode step must read (weights except gather-only tables, plus the KV cache at that
context) over the copy bandwidth measured here at the start; ``x floor`` = measured step / floor.
edgecc runs with TVM_NUM_THREADS = cores (printed); onnxruntime keeps its default threading.
Needs the ``bench`` extra: ``pip install -e .[bench]`` (llama-cpp-python builds from source, ~20 min).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import logging

logging.getLogger("onnxruntime").setLevel(logging.WARNING)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
PREFILL = 128


from bench_latency import _cores  # noqa: E402 - after the benchmarks folder is on sys.path


# ------------------------------------------------------------------------------------------------ runners


class SessionLLM:
    """Times anything with `prefill(ids) -> logits`, `decode(token) -> logits` and a `position`: edgecc's
    LLMSession and the onnxruntime reference decoder."""

    def __init__(self, session, info: str):
        self.s = session
        self.info = info

    def ttft(self, ids):
        t0 = time.perf_counter_ns()
        logits = self.s.prefill(ids)
        return (time.perf_counter_ns() - t0) / 1e6, int(np.argmax(logits))

    def _at_context(self, context: int) -> None:
        """Rows < context hold earlier tokens; a step's cost depends only on the position."""
        self.s.position = context

    def decode(self, context: int, steps: int, token: int):
        self._at_context(context)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            token = int(np.argmax(self.s.decode(token)))
            times.append((time.perf_counter_ns() - t0) / 1e6)
        return times


class EdgeccLLM(SessionLLM):
    def __init__(self, artifact: str, threads: int):
        from edgecc.runtime_bridge.llm_session import LLMSession

        session = LLMSession(artifact, num_threads=threads)
        super().__init__(session, f"TVM threads {threads}, max context {session.max_context}")


class OrtLLM(SessionLLM):
    def __init__(self, export_dir: str, threads: int):
        from edgecc.runtime_bridge.llm_reference import OrtDecoder

        super().__init__(OrtDecoder(export_dir), "onnxruntime default threading")

    def _at_context(self, context: int) -> None:
        kv = self.s.kv
        if kv[0].shape[2] != context:  # grow/shrink the cache to `context` rows (values irrelevant to cost)
            self.s.kv = [np.resize(k, (k.shape[0], k.shape[1], context, k.shape[3])).astype(np.float32) for k in kv]
        self.s.position = context


class LlamaCpp:
    def __init__(self, gguf: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)
        self.info = f"llama-cpp-python {llama_cpp.__version__}, n_threads {threads}"
        self.context_of = -1

    def _argmax(self) -> int:
        """The last evaluated token's logits (without logits_all, llama.cpp keeps only those)."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def ttft(self, ids):
        self.llm.reset()
        t0 = time.perf_counter_ns()
        self.llm.eval(ids)
        token = self._argmax()
        self.context_of = -1
        return (time.perf_counter_ns() - t0) / 1e6, token

    def decode(self, context: int, steps: int, token: int):
        if self.context_of != context:  # a real context of `context` tokens, once per length
            self.llm.reset()
            self.llm.eval([int(t) for t in np.random.default_rng(0).integers(100, 40000, context)])
            self.context_of = context
        self.llm.n_tokens = context  # eval() drops cache cells from here on: the same position each round
        times = []
        for _ in range(steps):
            t0 = time.perf_counter_ns()
            self.llm.eval([token])
            token = self._argmax()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        return times


def _worker(kind: str, path: str, threads: int, n_ctx: int, env: dict, conn) -> None:
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    try:
        if kind.startswith("edgecc"):
            runner = EdgeccLLM(path, threads)
        elif kind.startswith("ort"):
            runner = OrtLLM(path, threads)
        else:
            runner = LlamaCpp(path, threads, n_ctx)
        conn.send(("ready", runner.info))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
        return
    while True:
        method, args = conn.recv()
        if method == "stop":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(runner, method)(*args)))
        except Exception as exc:  # noqa: BLE001
            import traceback

            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class Worker:
    def __init__(self, ctx, kind, path, threads, n_ctx, env):
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(kind, path, threads, n_ctx, env, child), daemon=True)
        self.proc.start()
        child.close()
        status, payload = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"{kind} failed to start:\n{payload}")
        self.info = payload

    def call(self, method, *args):
        self.conn.send((method, args))
        status, payload = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.kind} failed in {method}:\n{payload}")
        return payload

    def stop(self):
        try:
            self.call("stop")
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(10)


# ------------------------------------------------------------------------------------------------ preparation


def _run(cmd: list[str]) -> None:
    import subprocess

    print("  $ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def prepare(workdir: Path, runtimes: list[str], max_context: int) -> dict[str, str]:
    """Export SmolLM2, build the edgecc artifacts and quantize the onnxruntime int4 graphs (cached)."""
    export = workdir / "smollm2"
    if not (export / "decode.onnx").exists():
        _run([sys.executable, "-m", "edgecc", "models", "export", "smollm2", "-o", str(export),
              "--prefill-len", str(PREFILL)])
    paths = {}
    for kind in runtimes:
        if kind in ("edgecc-fp32", "edgecc-w4", "edgecc-w4a8"):
            art = workdir / kind
            if not (art / "manifest.json").exists():
                cmd = [sys.executable, "-m", "edgecc", "build", str(export), "--max-context", str(max_context),
                       "-o", str(art), "--force"]
                if kind == "edgecc-w4":
                    cmd += ["--quantize", "w4g32-asym"]
                elif kind == "edgecc-w4a8":
                    cmd += ["--quantize", "w4g32a8-asym"]
                _run(cmd)
            paths[kind] = str(art)
        elif kind.startswith("edgecc@"):  # an artifact built elsewhere (A/B of two builds in one run)
            art = Path(kind.split("@", 1)[1]).expanduser()
            if not (art / "manifest.json").exists():
                raise SystemExit(f"{kind}: no edgecc artifact there (no manifest.json)")
            paths[kind] = str(art)
        elif kind == "ort-fp32":
            paths[kind] = str(export)
        elif kind.startswith("ort-int4"):
            level = int(kind.rsplit("acc", 1)[1])
            qdir = workdir / kind
            if not (qdir / "decode.onnx").exists():
                qdir.mkdir(parents=True, exist_ok=True)
                for name in ("prefill.onnx", "decode.onnx"):
                    quantize_int4(export / name, qdir / name, level)
            paths[kind] = str(qdir)
        elif kind == "llama.cpp":
            from edgecc.models.llama import smollm2_gguf_path

            paths[kind] = str(smollm2_gguf_path())
    return paths


def quantize_int4(src: Path, dst: Path, accuracy_level: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, accuracy_level=accuracy_level)
    q.process()
    onnx.save_model(q.model.model, str(dst))


def streamed_bytes(kind: str, path: str, export_dir: Path) -> int:
    """Weight bytes one decode step reads (gather-only tables excluded)."""
    from edgecc.models.gpt import streamed_weight_bytes

    if kind.startswith("edgecc"):
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        total = manifest["memory"]["weights_bytes"]
        embed = [p for p in manifest["params"] if p["name"].endswith("embed.weight") or "embed_weight" in p["name"]]
        return total - sum(int(np.prod(p["shape"])) * 4 for p in embed)
    if kind.startswith("ort"):
        return streamed_weight_bytes(Path(path) / "decode.onnx")["streamed"]
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)  # tied embedding = lm_head: all read


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--runtimes", default="edgecc-fp32,edgecc-w4,edgecc-w4a8,ort-fp32,ort-int4-acc0,ort-int4-acc4,llama.cpp")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round and context")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--threads", type=int, default=_cores())
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "edgecc" / "bench_llm")
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds between calls: idle thread pools of the other runtimes disturb llama.cpp (0.2 s: 43 vs 88 tok/s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    contexts = [int(c) for c in args.contexts.split(",")]
    max_context = max(contexts) + args.steps * 2 + PREFILL
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"preparing under {args.workdir} ...", file=sys.stderr)
    paths = prepare(args.workdir, runtimes, max_context)

    from bench_suite import measure_bandwidth

    from edgecc.models.llama import LlamaConfig

    cfg = LlamaConfig(**json.loads((args.workdir / "smollm2" / "llm.json").read_text())["config"])
    bw = measure_bandwidth(args.threads)
    print(f"copy bandwidth {bw['gb_per_s']:.1f} GB/s ({args.threads} threads)", file=sys.stderr)

    ctx = mp.get_context("spawn")
    env = {"TVM_NUM_THREADS": str(args.threads)}
    workers = []
    for kind in runtimes:
        print(f"starting {kind} ...", file=sys.stderr)
        workers.append(Worker(ctx, kind, paths[kind], args.threads, max_context, env))
    prompt = [int(t) for t in np.random.default_rng(1).integers(100, 40000, PREFILL)]
    results = {w.kind: {"ttft": [], **{f"decode@{c}": [] for c in contexts}, "first_token": None} for w in workers}
    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for w in workers:
                ms, tok = w.call("ttft", prompt)
                results[w.kind]["ttft"].append(ms)
                results[w.kind]["first_token"] = tok
                time.sleep(args.pause)
            for c in contexts:
                for w in workers:
                    results[w.kind][f"decode@{c}"].extend(w.call("decode", c, args.steps, 504))
                    time.sleep(args.pause)
    finally:
        for w in workers:
            w.stop()

    rows = []
    kv_per_token = cfg.kv_bytes_per_token(4)
    for w in workers:
        res = results[w.kind]
        sb = streamed_bytes(w.kind, paths[w.kind], args.workdir / "smollm2")
        row = {"runtime": w.kind, "info": w.info, "ttft_ms": statistics.median(res["ttft"]),
               "first_token": res["first_token"], "streamed_weight_bytes": sb}
        for c in contexts:
            step = statistics.median(res[f"decode@{c}"])
            kv = kv_per_token * c if w.kind != "llama.cpp" else cfg.kv_bytes_per_token(2) * c  # llama.cpp: f16 KV
            floor_ms = (sb + kv) / (bw["gb_per_s"] * 1e9) * 1e3
            row[f"tok_s@{c}"] = 1000.0 / step
            row[f"step_ms@{c}"] = step
            row[f"floor_ms@{c}"] = floor_ms
            row[f"x_floor@{c}"] = step / floor_ms
        rows.append(row)

    ref = {c: next((r[f"tok_s@{c}"] for r in rows if r["runtime"] == "llama.cpp"), None) for c in contexts}
    print(f"\nSmolLM2-135M on {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps, bandwidth {bw['gb_per_s']:.1f} GB/s\n")
    head = f"{'runtime':<14} {'TTFT ms':>8} " + " ".join(
        f"{'tok/s@' + str(c):>11} {'x floor':>7} {'vs l.cpp':>8}" for c in contexts)
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['runtime']:<14} {r['ttft_ms']:8.1f} "
        for c in contexts:
            vs = f"{r[f'tok_s@{c}'] / ref[c]:.2f}x" if ref[c] else "-"
            line += f"{r[f'tok_s@{c}']:11.1f} {r[f'x_floor@{c}']:7.2f} {vs:>8} "
        print(line)
    print("\nfirst tokens (same prompt):", {r["runtime"]: r["first_token"] for r in rows})
    for r in rows:
        print(f"  {r['runtime']}: {r['info']}; streamed weights {r['streamed_weight_bytes'] / 2**20:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bw, "rows": rows, "args": vars(args) | {
            "workdir": str(args.workdir), "json": str(args.json)}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
