#!/usr/bin/env python
"""Where a model's time goes: per-PrimFunc time of an edgecc build, with the schedule rule that took each one.

    TVM_NUM_THREADS=2 python benchmarks/profile_kernels.py --model gpt-prefill --top 15
    python benchmarks/profile_kernels.py --model resnet50-rw --no-schedules      # the naive kernels
    python benchmarks/profile_kernels.py --onnx m.onnx --top 0                     # all kernels

How it measures: the model is exported (`edgecc.models.registry`), built in-process with the same stages as
`edgecc build` (import, weight transforms lifted and run once, `relax_pipeline`, `relax.build`), and run once
in the Relax VM with the model's default feeds. TVM 0.27's `relax.VirtualMachine` has no `profile=True` /
`vm.profile`, so the VM's call instrument (`vm.set_instrument`) is used instead: before every call of a
compiled PrimFunc it runs that very call `--repeat` times on the real argument tensors (warm caches, the
real data and layouts of this model) and keeps the median; the VM then performs the call itself. A kernel
called several times (one per layer) is summed over its calls. Builtins (reshape views, allocation) are not
kernels and are not timed; the whole `main` call is timed separately, so "VM + other" is what is left.

Columns: total ms over all calls (median of the repeats: warm caches), cold ms (the first run of each call,
as the model runs it: weights and activations not in cache), calls, ms per call, % of the summed kernel time, GFLOP/s (only for
functions with multiply-accumulate reductions: 2 x the iteration space of each such block, counted on the
fused module before scheduling), the rule from `edgecc.schedules.schedule_report`, and the output shape.
The machine is shared: read the absolute numbers as rough and the percentages as the message.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------ FLOPs


def _reduction_flops(func) -> int:
    """2 x iteration space of every multiply-accumulate reduction block of a (not yet scheduled) PrimFunc."""
    import tvm_ffi
    from tvm import tirx

    total = [0]

    def visit(block):
        iters = list(block.iter_vars)
        if not any(int(iv.iter_type) == tirx.IterVar.CommReduce for iv in iters):
            return
        space = 1
        for iv in iters:
            if not isinstance(iv.dom.extent, tirx.IntImm):
                return
            space *= int(iv.dom.extent)
        muls = []
        tvm_ffi.structural_walk(block.body, (tirx.Mul, muls.append), order="pre")
        if muls:
            total[0] += 2 * space

    from tvm import s_tir

    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, visit), order="pre")
    return total[0]


def _out_shape(func) -> str:
    """Shape of the last buffer parameter (the output of a call_tir PrimFunc)."""
    try:
        ty = func.params[-1].ty  # TVM 0.27: a buffer parameter's type carries its shape
        return "x".join(str(int(d)) for d in ty.shape)
    except Exception:  # noqa: BLE001
        return "?"


# ------------------------------------------------------------------------------------------------ build


def build(onnx_path: Path, target: str, schedules: bool):
    """-> (executable, lowered module, fused-before-schedule module, weights, input names)."""
    import tvm
    from tvm import relax

    from edgecc.build import lift_weight_transforms, rewrite_weights
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import bind_dims, read_signature
    from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, relax_pipeline
    from edgecc.targets.registry import get_target

    spec = get_target(target)
    model = load_model(onnx_path)
    sig = bind_dims(read_signature(model), {})
    imported = import_model(model, sig)
    deploy, _transform, named = lift_weight_transforms(imported)
    deploy, named = rewrite_weights(deploy, named, spec)  # merged linears, GEMV weight panels: as the build
    weights = [w for _, w in named]
    with spec.tvm():
        fused = tvm.transform.Sequential(legalize_and_fuse_passes())(deploy)
    lowered = relax_pipeline(spec, with_schedules=schedules)(deploy)
    ex = relax.build(lowered, spec.tvm(), relax_pipeline=None)
    return ex, lowered, fused, weights, [t.name for t in sig.inputs]


# ------------------------------------------------------------------------------------------------ profile


def profile(ex, lowered, fused, weights, feeds: dict, input_names, repeat: int, whole_repeat: int):
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    from edgecc.runtime_bridge.host import set_num_threads
    from edgecc.schedules import schedule_report

    set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in input_names]
    args += [tvm.runtime.tensor(w, dev) for w in weights]
    main = vm["main"]
    main(*args)  # warm: lazy init, page faults

    whole = []
    for _ in range(whole_repeat):
        t0 = time.perf_counter()
        main(*args)
        whole.append(time.perf_counter() - t0)

    prim_names = {gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    samples: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if before_run and symbol in prim_names:
            t0 = time.perf_counter()
            func(*call_args)  # the call as the model makes it (cold caches: weights, activations)
            first.setdefault(symbol, []).append(time.perf_counter() - t0)
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                func(*call_args)
                ts.append(time.perf_counter() - t0)
            samples.setdefault(symbol, []).append(statistics.median(ts))
        return 0  # VMInstrumentReturnKind.kNoOp: the VM runs the call as usual

    vm.set_instrument(tvm_ffi.convert(instrument))
    main(*args)

    rules = schedule_report(lowered)
    flops = {gv.name_hint: _reduction_flops(f) for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    shapes = {gv.name_hint: _out_shape(f) for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}
    rows = []
    for name, ts in samples.items():
        total = sum(ts)
        fl = flops.get(name, 0) * len(ts)
        rows.append({"name": name, "ms": total * 1e3, "cold_ms": sum(first[name]) * 1e3, "calls": len(ts), "per_call_ms": total * 1e3 / len(ts),
                     "gflops": fl / total / 1e9 if fl else None, "rule": rules.get(name, "?"),
                     "shape": shapes.get(name, "?")})
    rows.sort(key=lambda r: -r["ms"])
    return rows, statistics.median(whole) * 1e3


def print_table(rows, whole_ms: float, top: int) -> None:
    ksum = sum(r["ms"] for r in rows)
    shown = rows if top <= 0 else rows[:top]
    print(f"{'#':>3} {'kernel':44s} {'ms':>8s} {'cold':>8s} {'calls':>5s} {'ms/call':>8s} {'%':>6s} {'cum%':>6s} "
          f"{'GFLOP/s':>8s}  {'rule':18s} out")
    cum = 0.0
    for i, r in enumerate(shown, 1):
        cum += r["ms"]
        gf = f"{r['gflops']:.1f}" if r["gflops"] else "-"
        name = r["name"] if len(r["name"]) <= 44 else r["name"][:41] + "..."
        print(f"{i:3d} {name:44s} {r['ms']:8.3f} {r['cold_ms']:8.3f} {r['calls']:5d} {r['per_call_ms']:8.3f} "
              f"{100 * r['ms'] / ksum:5.1f}% {100 * cum / ksum:5.1f}% {gf:>8s}  {r['rule'][:60]:18s} {r['shape']}")
    if len(shown) < len(rows):
        rest = rows[len(shown):]
        print(f"    ... {len(rest)} more kernels: {sum(r['ms'] for r in rest):.3f} ms "
              f"({100 * sum(r['ms'] for r in rest) / ksum:.1f}%)")
    by_rule: dict[str, float] = {}
    for r in rows:
        key = r["rule"].split(" (")[0]
        by_rule[key] = by_rule.get(key, 0.0) + r["ms"]
    print("by rule : " + ", ".join(f"{k} {v:.2f} ms ({100 * v / ksum:.0f}%)"
                                     for k, v in sorted(by_rule.items(), key=lambda kv: -kv[1])))
    cold = sum(r["cold_ms"] for r in rows)
    print(f"kernels : {ksum:.2f} ms summed (cold: {cold:.2f} ms) over {sum(r['calls'] for r in rows)} calls of {len(rows)} functions; "
          f"whole main() {whole_ms:.2f} ms (median, uninstrumented); VM + other {whole_ms - ksum:+.2f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt-prefill", help="a name from edgecc.models.registry.MODELS")
    src.add_argument("--onnx", help="an ONNX file with static shapes (random float / zero int feeds)")
    ap.add_argument("--top", type=int, default=20, help="rows to print (0: all)")
    ap.add_argument("--target", default="host")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs of each kernel call (median kept)")
    ap.add_argument("--whole-repeat", type=int, default=10, help="timed runs of the whole main()")
    ap.add_argument("--no-schedules", action="store_true", help="profile the unscheduled kernels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgecc_prof_") as tmp:
        if args.onnx:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from bench_latency import _feeds_from_signature

            path = Path(args.onnx)
            feeds, _ = _feeds_from_signature(path, {}, args.seed)
            label = path.name
        else:
            from edgecc.models.registry import MODELS

            entry = MODELS[args.model]
            path = entry.export(Path(tmp) / f"{args.model}.onnx")
            feeds = entry.feeds(seed=args.seed)
            label = args.model
        t0 = time.perf_counter()
        ex, lowered, fused, weights, names = build(path, args.target, not args.no_schedules)
        build_s = time.perf_counter() - t0
        rows, whole = profile(ex, lowered, fused, weights, feeds, names, args.repeat, args.whole_repeat)
    print(f"model {label}, target {args.target}, schedules {'off' if args.no_schedules else 'on'}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, build {build_s:.1f} s, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print_table(rows, whole, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
