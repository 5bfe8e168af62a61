#!/usr/bin/env python
"""The schedules issue's benchmark table in one run: edgecc vs onnxruntime, same ONNX, interleaved.

    python benchmarks/bench_suite.py                                # all rows, 30 timed calls each
    python benchmarks/bench_suite.py --rows gpt-decode --iters 50   # one row
    python benchmarks/bench_suite.py --iters 20 --markdown --json suite.json
    python benchmarks/bench_suite.py --iters 20 --tuning-db /tmp/tunedb-host        # tuned (`edgecc tune --db`)

Rows (``--rows``, comma list; any `edgecc models list` name also works, a name containing "decode" gets the
DRAM floor):

    minilm       all-MiniLM-L6-v2, [1, 128] ids + mask                          goal: edgecc <= 1.2x onnxruntime
    gpt-prefill  GPT-2-style decoder (6 x d768, vocab 8192), 128-token prefill   goal: <= 1.2x
    gpt-decode   the same decoder, one token on a 128-long KV cache             goal: <= 1.0x, + DRAM floor
    resnet50     ResNet-50 from the onnx wheel's light models, random weights   goal: <= 1.2x

Each row reuses bench_latency.py's machinery: edgecc and onnxruntime each in their own spawned worker process
(edgecc builds the artifact there, timed as ``build s``; goal for MiniLM < 60 s), both outputs compared, then
``--warmup`` + ``--iters`` strictly alternating calls with a pause, each worker timing only its own call.
Rows run one after another; the workers of a row are stopped before the next row starts. The pause defaults
to 0.2 s, not bench_latency's 0.05 s: with 0.05 s, onnxruntime's workers were still spinning when edgecc's call
began, and a tiny decode step measured 18.5 ms for edgecc instead of 0.87 ms (0.15 s was already enough).

Schedules: without ``--tuning-db`` the edgecc worker builds with the default schedules only: its
``EDGECC_TUNING_DIR`` points at an empty directory, so a database in the target's default location
(``edgecc tune`` without ``--db``) cannot leak into an "untuned" table. With ``--tuning-db DIR`` (a database
``edgecc tune --db DIR`` wrote for the same target) the worker's ``EDGECC_TUNING_DIR`` holds only a link to DIR
under the target's database name, so the build applies exactly those records (docs/tuning.md: a record only
where it beat the default schedule by >= 2%). The table's ``tuned`` column is the artifact manifest's
``schedules.tuning_db``: kernels scheduled from the database / kernels whose records lost to the default.

DRAM floor (decode rows): memory bandwidth is measured in this (parent) process right before the row, as the
best of 5 copies of a 256 MiB float64 buffer (``np.copyto`` on slices split over ``--threads`` Python threads;
numpy releases the GIL while copying), counted STREAM-style as 2 x 256 MiB (read + write) per copy. The floor is
``streamed weight bytes / bandwidth``: every initializer of the ONNX file except tables that are only Gather'ed
(the token and position embeddings; a step reads one row of each). The past KV cache is read too (printed,
not in the floor). ``edgecc/floor`` and ``ort/floor`` say how far each runtime is from it. A decode step only
reads its weights, and reading streams slower than copying on this machine, so the summary also gives the
read floor: the same bytes over the read bandwidth of a TVM kernel that sums a 256 MiB buffer on the same
threads (``measure_read_bandwidth``), the floor a runtime can actually approach.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned workers get this sys.path too, so they can import bench_latency
sys.path.insert(1, str(HERE.parent))

import bench_latency as bl  # noqa: E402

# row key -> (registry name, label, goal ratio edgecc/onnxruntime)
ROWS = {
    "minilm": ("minilm", "MiniLM-L6 seq128", 1.2),
    "gpt-prefill": ("gpt-prefill", "GPT prefill 128", 1.2),
    "gpt-decode": ("gpt-decode", "GPT decode @128", 1.0),
    "resnet50": ("resnet50-rw", "ResNet-50", 1.2),
}
MINILM_BUILD_GOAL_S = 60.0


def measure_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> dict:
    """Best-of-`repeats` copy bandwidth in GB/s (10^9 B/s), counting read + write, over `threads` threads."""
    n = mib * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.zeros(n, dtype=np.float64)  # both touched: no page faults inside the timed copies
    bounds = np.linspace(0, n, threads + 1).astype(int)
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))
            best = min(best, time.perf_counter() - t0)
    return {"gb_per_s": 2 * src.nbytes / best / 1e9, "threads": threads, "buffer_mib": mib, "repeats": repeats,
            "method": "np.copyto over threads, (read+write bytes)/best time"}


def _read_bandwidth_worker(threads: int, mib: int, repeats: int, conn) -> None:
    import tvm
    from tvm.script import tirx as T

    from edgecc.runtime_bridge.host import set_num_threads
    from edgecc.targets.registry import get_target

    set_num_threads(threads)
    lanes, unroll = 16, 8
    n = mib * 2**20 // 4
    per_job = n // threads // (lanes * unroll) * (lanes * unroll)
    J, PJ, L = T.int64(threads), T.int64(per_job), T.int64(lanes)

    @T.prim_func
    def read_sum(a: T.Buffer((T.int64(n),), "float32"), out: T.Buffer((J, L), "float32")):
        T.func_attr({"tirx.noalias": True})
        for j in T.parallel(J):
            acc = T.decl_buffer((unroll,), f"float32x{lanes}", scope="local")
            for u in T.unroll(unroll):
                acc[u] = T.broadcast(T.float32(0), lanes)
            for i in range(PJ // T.int64(lanes * unroll)):
                for u in T.unroll(unroll):
                    acc[u] = acc[u] + a[T.ramp(j * PJ + i * T.int64(lanes * unroll) + T.int64(u * lanes),
                                               T.int64(1), lanes)]
            for u in T.serial(1, unroll):
                acc[0] = acc[0] + acc[u]
            out[j, T.ramp(T.int64(0), T.int64(1), lanes)] = acc[0]

    lib = tvm.compile(tvm.IRModule({"main": read_sum}), target=get_target("host").tvm())
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.ones(n, np.float32), dev)
    out = tvm.runtime.tensor(np.zeros((threads, lanes), np.float32), dev)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call also starts the thread pool
        t0 = time.perf_counter()
        lib["main"](a, out)
        best = min(best, time.perf_counter() - t0)
    total = float(out.numpy().sum())
    conn.send({"gb_per_s": threads * per_job * 4 / best / 1e9, "threads": threads, "buffer_mib": mib,
               "repeats": repeats, "checksum_ok": total == threads * per_job,
               "method": "TVM kernel summing a float32 buffer, one contiguous part per thread, bytes read/best time"})


def measure_read_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> dict:
    """Best-of-`repeats` read-only bandwidth in GB/s: a vectorised sum over `threads` threads, in a process of
    its own (its TVM thread pool must not linger beside the timed runtimes). A decode step only reads its
    weights, and on this machine reading streams slower than the copy above suggests (measured 24-25 GB/s
    read vs 36-45 GB/s copy with 2 threads), so the read floor is the one a runtime can approach."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_bandwidth_worker, args=(threads, mib, repeats, child), daemon=True)
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def _decode_bytes(onnx_path: Path, feeds: dict) -> dict:
    from edgecc.models.gpt import streamed_weight_bytes

    out = streamed_weight_bytes(onnx_path)
    out["past_kv"] = int(sum(v.nbytes for k, v in feeds.items() if k.startswith("past")))
    return out


def tuning_dir_env(target: str, tuning_db: str | None, workdir: Path) -> dict:
    """The worker's EDGECC_TUNING_DIR: empty (default schedules only), or holding a link to `tuning_db`."""
    from edgecc.schedules.tuning import default_database_dir, has_records
    from edgecc.targets.registry import get_target

    root = workdir / "tuning"
    root.mkdir(exist_ok=True)
    if tuning_db:
        db = Path(tuning_db).expanduser().resolve()
        if not has_records(db):
            raise SystemExit(f"--tuning-db {db}: no tuning records there; run `edgecc tune MODEL --db {db}` first")
        link = root / default_database_dir(get_target(target)).name
        if not link.exists():
            link.symlink_to(db, target_is_directory=True)
    return {"EDGECC_TUNING_DIR": str(root)}


def _tuning_applied(artifact: str | None) -> dict | None:
    if not artifact:
        return None
    try:
        manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    except OSError:
        return None
    return manifest.get("schedules", {}).get("tuning_db")


def run_row(key: str, args, threads: int, workdir: Path) -> dict:
    from edgecc.models import registry

    name, label, goal = ROWS.get(key, (key, key, None))
    if name not in registry.MODELS:
        raise SystemExit(f"unknown row {key!r}; rows: {', '.join(ROWS)} or a model name from: {', '.join(registry.MODELS)}")
    entry = registry.MODELS[name]
    rowdir = workdir / key
    rowdir.mkdir()
    t0 = time.perf_counter()
    onnx_path = entry.export(rowdir / f"{name}.onnx")
    export_s = time.perf_counter() - t0
    feeds = entry.feeds(seed=args.seed)
    feeds_path = rowdir / "feeds.npz"
    np.savez(feeds_path, **feeds)
    row = {"row": key, "model": name, "label": label, "goal_ratio": goal, "export_s": round(export_s, 1),
           "inputs": {k: [str(v.dtype), list(v.shape)] for k, v in feeds.items()}}
    print(f"\n== {label} ({name}): exported in {export_s:.1f} s, "
          + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in list(feeds.items())[:3])
          + (" ..." if len(feeds) > 3 else ""), flush=True)

    decode = "decode" in name
    if decode:
        row["bytes"] = _decode_bytes(onnx_path, feeds)
        row["bandwidth"] = measure_bandwidth(args.bw_threads or threads)
        row["read_bandwidth"] = measure_read_bandwidth(args.bw_threads or threads)
        print(f"   bandwidth {row['bandwidth']['gb_per_s']:.1f} GB/s copy, "
              f"{row['read_bandwidth']['gb_per_s']:.1f} GB/s read ({row['bandwidth']['threads']} threads); "
              f"streamed weights {row['bytes']['streamed'] / 1e6:.1f} MB, past KV {row['bytes']['past_kv'] / 1e6:.1f} MB",
              flush=True)

    ctx = mp.get_context("spawn")
    env = {"TVM_NUM_THREADS": str(threads), **tuning_dir_env(args.target, args.tuning_db, workdir)}
    options = {"target": args.target, "artifact": None, "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    workers = []
    try:
        for kind in ("edgecc", "onnxruntime"):  # one at a time: a build should not share the cores with an import
            w = bl.Worker(ctx, kind, str(onnx_path), str(feeds_path), str(rowdir), options, env)
            workers.append(w)
            info = w.wait_ready(args.setup_timeout)
            print(f"   {kind:<12} ready: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "artifact"),
                  flush=True)
        row["tuning_db"] = _tuning_applied(workers[0].info.get("artifact"))
        outs = {w.kind: w.call("outputs") for w in workers}
        diffs = {}
        for oname, ref in outs["onnxruntime"].items():
            got = outs["edgecc"].get(oname)
            if got is None or got.shape != ref.shape:
                diffs[oname] = float("inf")
            else:
                diffs[oname] = float(np.abs(got.astype(np.float64) - ref).max())
        row["max_abs_diff"] = max(diffs.values())
        row["worst_output"] = max(diffs, key=diffs.get)
        for _ in range(args.warmup):
            for w in workers:
                w.call("time")
                time.sleep(args.pause)
        times = {w.kind: [] for w in workers}
        load_before = os.getloadavg()
        for _ in range(args.iters):
            for w in workers:
                times[w.kind].append(w.call("time"))
                time.sleep(args.pause)
        load_after = os.getloadavg()
    finally:
        for w in workers:
            w.stop()

    row["build_s"] = workers[0].info["build_s"]
    row["ort_setup_s"] = workers[1].info["build_s"]
    row["threads"] = {w.kind: w.info["threads"] for w in workers}
    row["stats"] = {k: bl.summarize(v) for k, v in times.items()}
    row["raw_ms"] = times
    row["load_avg"] = {"before": load_before, "after": load_after}
    e, o = row["stats"]["edgecc"]["median_ms"], row["stats"]["onnxruntime"]["median_ms"]
    row["ratio"] = e / o
    row["ratio_paired"] = statistics.median(a / b for a, b in zip(times["edgecc"], times["onnxruntime"]))
    if decode:
        floor_ms = row["bytes"]["streamed"] / (row["bandwidth"]["gb_per_s"] * 1e9) * 1e3
        row["floor_ms"] = floor_ms
        row["edgecc_over_floor"] = e / floor_ms
        row["ort_over_floor"] = o / floor_ms
        read_floor_ms = row["bytes"]["streamed"] / (row["read_bandwidth"]["gb_per_s"] * 1e9) * 1e3
        row["read_floor_ms"] = read_floor_ms
        row["edgecc_over_read_floor"] = e / read_floor_ms
        row["ort_over_read_floor"] = o / read_floor_ms
    print(f"   edgecc {e:.2f} ms, onnxruntime {o:.2f} ms, ratio {row['ratio']:.2f}x "
          f"(paired {row['ratio_paired']:.2f}x), max|diff| {row['max_abs_diff']:.2g} ({row['worst_output']}), "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}"
          + (f"; floor {row['floor_ms']:.2f} ms" if decode else "") + _tuned_note(row), flush=True)
    return row


def _tuned_note(row) -> str:
    db = row.get("tuning_db")
    if not db or not db.get("applied"):
        return "; default schedules"
    return f"; tuning db {db['database']}: {db['tuned_functions']} kernels tuned, {db['default_faster']} default-faster"


def _fmt_tuned(row) -> str:
    db = row.get("tuning_db")
    if not db or not db.get("applied"):
        return "-"
    return f"{db['tuned_functions']}/{db['default_faster']}"


def _fmt_goal(row) -> str:
    goal = row.get("goal_ratio")
    if goal is None:
        return "-"
    return f"{'met' if row['ratio'] <= goal else 'missed'} (≤{goal:g}x)"


def table_lines(rows: list[dict], markdown: bool) -> list[str]:
    head = ["row", "edgecc ms", "ort ms", "ratio", "paired", "goal", "build s", "max abs diff", "floor ms",
            "edgecc/floor", "ort/floor", "tuned", "load"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["label"], "error", "", "", "", "", "", "", "", "", "", "", r["error"].splitlines()[0][:60]])
            continue
        build = f"{r['build_s']:.1f}"
        if r["model"].startswith("minilm"):
            build += " ✓" if r["build_s"] < MINILM_BUILD_GOAL_S else " ✗"
        dec = "floor_ms" in r
        body.append([
            r["label"],
            f"{r['stats']['edgecc']['median_ms']:.2f}",
            f"{r['stats']['onnxruntime']['median_ms']:.2f}",
            f"{r['ratio']:.2f}x",
            f"{r['ratio_paired']:.2f}x",
            _fmt_goal(r),
            build,
            f"{r['max_abs_diff']:.1g}",
            f"{r['floor_ms']:.2f}" if dec else "",
            f"{r['edgecc_over_floor']:.2f}x" if dec else "",
            f"{r['ort_over_floor']:.2f}x" if dec else "",
            _fmt_tuned(r),
            f"{r['load_avg']['before'][0]:.1f}→{r['load_avg']['after'][0]:.1f}",
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
        return out + ["| " + " | ".join(cells) + " |" for cells in body]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(head)] + [fmt(c) for c in body]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list (default: {','.join(ROWS)})")
    ap.add_argument("--iters", type=int, default=30, help="timed calls per runtime per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime first")
    ap.add_argument("--pause", type=float, default=0.2,
                    help="seconds between calls (default 0.2: onnxruntime's spinning workers must settle first)")
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS for edgecc (default: usable cores)")
    ap.add_argument("--bw-threads", type=int, default=None, help="threads for the bandwidth copy (default: --threads)")
    ap.add_argument("--target", default="host")
    ap.add_argument("--tuning-db", metavar="DIR", default=None,
                    help="apply this `edgecc tune --db DIR` database in the edgecc builds (default: default "
                         "schedules only, the target's default database is ignored)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setup-timeout", type=float, default=3600, help="seconds a worker may take to build/load")
    ap.add_argument("--json", help="also write every row (stats, raw times, bandwidth, bytes) to this file")
    ap.add_argument("--markdown", action="store_true", help="print the final table as markdown")
    args = ap.parse_args(argv)

    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    threads = args.threads or int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or bl._cores()
    t_start = time.time()
    load_start = os.getloadavg()
    print(f"machine: {platform.machine()}, {bl._cores()} usable cores, edgecc TVM_NUM_THREADS={threads}, "
          f"onnxruntime default threads; load avg {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print("edgecc schedules: " + (f"default rules + tuning database {Path(args.tuning_db).expanduser().resolve()} "
                                  "(records that beat the default by >= 2%)" if args.tuning_db
                                  else "default rules only (no tuning database)"))
    print(f"rows: {', '.join(keys)}; {args.iters} timed calls each (after {args.warmup} warm-up), alternating, "
          f"{args.pause * 1000:.0f} ms pause")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecc_suite_") as tmp:
        for key in keys:
            try:
                rows.append(run_row(key, args, threads, Path(tmp)))
            except RuntimeError as exc:
                print(f"   error: {exc}", file=sys.stderr, flush=True)
                label = ROWS.get(key, (key, key, None))[1]
                rows.append({"row": key, "label": label, "error": str(exc)})
    load_end = os.getloadavg()
    wall = time.time() - t_start

    print(f"\n{args.iters} calls per runtime per row; ratio = edgecc median / onnxruntime median (>1: edgecc "
          f"slower), paired = median of per-round ratios; tuned = kernels scheduled from the tuning database / "
          f"kernels whose records lost to the default ('-': none applied); load avg (1 min) during the timed loop")
    for line in table_lines(rows, args.markdown):
        print(line)
    for r in rows:
        if "floor_ms" in r:
            bw = r["bandwidth"]
            print(f"floor ({r['label']}): {r['bytes']['streamed'] / 1e6:.1f} MB streamed weights / "
                  f"{bw['gb_per_s']:.1f} GB/s copy bandwidth ({bw['threads']} threads, best of {bw['repeats']} x "
                  f"{bw['buffer_mib']} MiB, read+write) = {r['floor_ms']:.2f} ms; past KV adds "
                  f"{r['bytes']['past_kv'] / 1e6:.1f} MB read (not in the floor)")
            rb = r["read_bandwidth"]
            print(f"read floor ({r['label']}): the same bytes / {rb['gb_per_s']:.1f} GB/s read bandwidth (a TVM kernel "
                  f"summing {rb['buffer_mib']} MiB on {rb['threads']} threads, best of {rb['repeats']}) = "
                  f"{r['read_floor_ms']:.2f} ms: edgecc {r['edgecc_over_read_floor']:.2f}x, onnxruntime "
                  f"{r['ort_over_read_floor']:.2f}x of it")
    print(f"wall {wall / 60:.1f} min; load avg start {load_start[0]:.2f}, end {load_end[0]:.2f} "
          f"(5-min {load_end[1]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "iters": args.iters, "warmup": args.warmup,
                                               "pause_s": args.pause, "threads": threads,
                                               "load_avg": {"start": load_start, "end": load_end},
                                               "wall_s": wall}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
