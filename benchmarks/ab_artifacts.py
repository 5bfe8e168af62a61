"""Two or more edgecc builds of one model, loaded in one process, calls alternating: which build is faster.

For changes too small to see through this machine's noise in separate-process runs (a schedule knob, a pass):
build the model before and after (`edgecc build m.onnx -o before`, change, `edgecc build m.onnx -o after`), then

    python benchmarks/ab_artifacts.py --model squeezenet-rw before/ after/ --rounds 150
    python benchmarks/ab_artifacts.py --onnx m.onnx before/ after/ [--dim batch=1]

Each round calls every build once, in turn; the report is every build's median and the median of its per-round
ratio to the first build (paired: a slow moment of the machine hits both calls of a round). Outputs are compared
with the first build's first. This is not a comparison with another runtime: `bench_latency.py` and
`bench_suite.py` do that, each runtime in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def feeds_for(model: str | None, onnx_path: str | None, dims: list[str] | None, seed: int) -> dict:
    """A registry model's seeded feeds, or random ones for an ONNX file (as `bench_latency.py --model` makes)."""
    if model:
        from edgecc.models.registry import MODELS

        return MODELS[model].feeds(seed=seed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_latency import _feeds_from_signature, _parse_dims

    feeds, _ = _feeds_from_signature(Path(onnx_path), _parse_dims(dims), seed)
    return feeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a name from `edgecc models list` (its seeded feeds)")
    src.add_argument("--onnx", help="the ONNX file the artifacts were built from (random float / zero int feeds)")
    ap.add_argument("artifacts", nargs="+", help="artifact directories built from the same model")
    ap.add_argument("--dim", action="append", help="NAME=INT for a symbolic input dim of --onnx (as it was built)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="TVM threads (default: $TVM_NUM_THREADS, else cores)")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds idle before every call (default 0: back to back). The benchmarks pause 0.2 s "
                         "between calls; caches and the core's state after an idle gap differ from back-to-back")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    threads = args.threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    from edgecc.runtime_bridge.host import load_artifact, set_num_threads

    set_num_threads(threads)
    feeds = feeds_for(args.model, args.onnx, args.dim, args.seed)
    loaded = [load_artifact(d) for d in args.artifacts]
    calls = [m.time_run(feeds) for m in loaded]
    first = [np.asarray(v) for v in loaded[0].run(feeds).values()]
    for d, m in zip(args.artifacts, loaded):
        outs = [np.asarray(v) for v in m.run(feeds).values()]
        diff = max(float(np.abs(a.astype("float64") - b).max()) for a, b in zip(outs, first))
        print(f"{d}: max |diff| vs {args.artifacts[0]} {diff:.2e}")
    for call in calls:
        for _ in range(args.warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(args.rounds):
        for i, call in enumerate(calls):
            if args.pause > 0:
                time.sleep(args.pause)
            t0 = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t0)
    base = np.array(times[0])
    print(f"{args.rounds} rounds, TVM threads {threads}, {args.pause:g} s pause before each call; "
          "paired = median of per-round ratios to the first")
    for d, ts in zip(args.artifacts, times):
        print(f"{d:40s} median {np.median(ts) * 1e3:8.3f} ms   paired {np.median(np.array(ts) / base):.3f}")
    return 0


if __name__ == "__main__":
    from edgecc.errors import EdgeccError

    try:
        sys.exit(main())
    except EdgeccError as err:  # a user mistake (no such artifact, wrong model): one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
