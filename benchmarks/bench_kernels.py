"""Time key kernels: untuned TVM vs edgecc default schedules vs numpy (float32). Prints, asserts nothing.

    TVM_NUM_THREADS=2 python benchmarks/bench_kernels.py [--target host] [--only matmul] [--repeat 30]

Each case is a small Relax function compiled with the edgecc pipeline twice (without and with
`edgecc.schedules`); the numbers are medians of `repeat` timed runs (the untuned ones get fewer runs,
they are slow). numpy uses its BLAS with its default threads. The machine is shared: read them as rough.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from edgecc.ir_passes.pipeline import relax_pipeline  # noqa: E402
from edgecc.schedules import schedule_report  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402

R = relax.op


def _module(inputs, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in inputs]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


def _gelu_ref(z):
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover
        erf = _erf
    return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layernorm(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b


def cases():
    """(name, relax module, input shapes, numpy implementation)"""
    out = []

    def dense(m, k, n):
        return (f"dense {m}x{k} @ {k}x{n}", _module([("x", (m, k)), ("w", (k, n))], lambda bb, x, w: R.matmul(x, w)),
                [(m, k), (k, n)], lambda x, w: x @ w)

    out.append(dense(128, 384, 384))
    out.append(dense(128, 384, 1536))
    out.append(dense(128, 1536, 384))
    out.append(dense(512, 512, 512))
    out.append(("dense+bias+gelu 128x384 @ 384x1536",
                _module([("x", (128, 384)), ("w", (384, 1536)), ("b", (1536,))],
                        lambda bb, x, w, b: R.nn.gelu(bb.emit(R.add(bb.emit(R.matmul(x, w)), b)))),
                [(128, 384), (384, 1536), (1536,)], lambda x, w, b: _gelu_ref(x @ w + b)))
    out.append(("batched 12x128x64 @ 12x64x128",
                _module([("q", (12, 128, 64)), ("k", (12, 64, 128))], lambda bb, q, k: R.matmul(q, k)),
                [(12, 128, 64), (12, 64, 128)], lambda q, k: q @ k))
    out.append(("batched 12x128x128 @ 12x128x64",
                _module([("p", (12, 128, 128)), ("v", (12, 128, 64))], lambda bb, p, v: R.matmul(p, v)),
                [(12, 128, 128), (12, 128, 64)], lambda p, v: p @ v))
    out.append(("gemv 1x576 @ 576x1536",
                _module([("x", (1, 576)), ("w", (576, 1536))], lambda bb, x, w: R.matmul(x, w)),
                [(1, 576), (576, 1536)], lambda x, w: x @ w))
    out.append(("softmax 12x128x128",
                _module([("s", (12, 128, 128))], lambda bb, s: R.nn.softmax(s, axis=-1)),
                [(12, 128, 128)], _softmax))
    out.append(("layernorm 128x384",
                _module([("x", (128, 384)), ("g", (384,)), ("b", (384,))],
                        lambda bb, x, g, b: R.nn.layer_norm(x, g, b, axes=[-1])),
                [(128, 384), (384,), (384,)], _layernorm))
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))

        def conv_ref(x, w):
            return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()

        out.append(("conv3x3 1x64x56x56 -> 64 (ref: torch)",
                    _module([("x", (1, 64, 56, 56)), ("w", (64, 64, 3, 3))],
                            lambda bb, x, w: R.nn.conv2d(x, w, padding=1)),
                    [(1, 64, 56, 56), (64, 64, 3, 3)],
                    lambda x, w: conv_ref(x.astype("float32"), w.astype("float32"))))
    except ImportError:  # pragma: no cover - torch is optional here
        pass
    return out


def _time_numpy(fn, args, repeat):
    fn(*args)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _time_tvm(mod, spec, args, repeat, with_schedules):
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec, with_schedules=with_schedules))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    targs = [tvm.runtime.tensor(a) for a in args]
    out = vm["main"](*targs).numpy()
    ev = vm.time_evaluator("main", tvm.cpu(), number=max(1, 10 // max(1, repeat // 10)) if with_schedules else 1,
                           repeat=repeat, min_repeat_ms=0)
    return float(np.median(ev(*targs).results)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="host")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-untuned", action="store_true", help="skip the (slow) unscheduled builds")
    args = ap.parse_args()
    spec = get_target(args.target)
    rng = np.random.default_rng(0)
    print(f"target {spec.name} ({spec.tvm_target.get('mcpu', '')}, {spec.vector_bits}-bit vectors), "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")
    print(f"{'kernel':38s} {'untuned':>10s} {'edgecc':>10s} {'numpy':>10s} {'edgecc/numpy':>13s} "
          f"{'speedup':>8s}  rule / max err")
    for name, mod, shapes, ref in cases():
        if args.only and args.only not in name:
            continue
        inputs = [rng.standard_normal(s).astype("float32") for s in shapes]
        t_np = _time_numpy(ref, inputs, args.repeat)
        t_ed, out = _time_tvm(mod, spec, inputs, args.repeat, True)
        t_un = float("nan")
        if not args.no_untuned:
            t_un, _ = _time_tvm(mod, spec, inputs, max(3, args.repeat // 10), False)
        expect = ref(*[a.astype("float64") for a in inputs])
        err = float(np.abs(out - expect).max())
        fused = tvm.transform.Sequential(_fuse_passes())(mod)
        with spec.tvm():
            from edgecc.schedules import cpu_schedule_passes

            rules = sorted(set(schedule_report(tvm.transform.Sequential(cpu_schedule_passes(spec))(fused)).values()))
        print(f"{name:38s} {t_un * 1e3:9.3f}ms {t_ed * 1e3:9.3f}ms {t_np * 1e3:9.3f}ms {t_ed / t_np:12.2f}x "
              f"{t_un / t_ed:7.1f}x  {','.join(rules)} / {err:.1e}", flush=True)


def _fuse_passes():
    from edgecc.ir_passes.pipeline import legalize_and_fuse_passes

    return legalize_and_fuse_passes()


if __name__ == "__main__":
    main()
