"""Decode-style GEMV: fp32 vs quantized weights, each an `edgecc build` of a one-MatMul ONNX model.

    TVM_NUM_THREADS=2 python benchmarks/bench_quantized.py [--schemes w8,w4g32] [--rounds 15] [--number 200]

Shapes are SmolLM2-135M's projections at batch 1 (1x576 @ 576x1536 and 1x1536 @ 1536x576); `--shape MxKxN`
adds others. Every variant is built with `build_artifact` (fp32: no --quantize) for `--target` and loaded
like any artifact; the timing is the Relax VM's own `time_evaluator` (no Python per call), `number` calls per
sample, samples taken round-robin over the variants (so they share the background load), median reported.
Weight bytes are what params.bin holds for the layer; GB/s = weight bytes / median time. Prints, asserts
nothing. The machine may be shared: read the absolute numbers as rough, the ratios as steadier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def _gemv_onnx(path: Path, m: int, k: int, n: int, seed: int = 0) -> np.ndarray:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8,w4g32", help="comma-separated; fp32 is always included")
    ap.add_argument("--shape", action="append", default=[], help="extra MxKxN (default: SmolLM2 GEMVs)")
    ap.add_argument("--target", default="host")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=200)
    args = ap.parse_args()

    import tvm
    from tvm import relax

    from edgecc.build import build_artifact
    from edgecc.compress.rtn import quantize_rtn
    from edgecc.runtime_bridge.host import set_num_threads
    from edgecc.runtime_bridge.params_file import read_params

    threads = int(os.environ["TVM_NUM_THREADS"])
    set_num_threads(threads)
    shapes = [(1, 576, 1536), (1, 1536, 576)] + [tuple(int(v) for v in s.split("x")) for s in args.shape]
    variants = ["fp32"] + [s for s in args.schemes.split(",") if s]
    print(f"target {args.target}, TVM_NUM_THREADS={threads}, rounds {args.rounds} x {args.number} calls")
    print(f"{'shape':>16} {'variant':>12} {'median us':>10} {'p10':>8} {'p90':>8} {'weight B':>10} "
          f"{'GB/s':>7} {'vs fp32':>8} {'max rel err':>12}")
    with tempfile.TemporaryDirectory(prefix="edgecc-bench-q-") as tmp_name:
        tmp = Path(tmp_name)
        for m, k, n in shapes:
            onnx_path = tmp / f"gemv_{m}x{k}x{n}.onnx"
            w = _gemv_onnx(onnx_path, m, k, n)
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            runs = {}
            for v in variants:
                out = tmp / f"{m}x{k}x{n}_{v}"
                build_artifact(onnx_path, out, target=args.target, quantize=None if v == "fp32" else v)
                params = read_params(out / "params.bin")
                dev = tvm.cpu()
                vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), dev)
                call_args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(np.ascontiguousarray(a), dev)
                                                            for _, a in params]
                y = vm["main"](*call_args).numpy()
                ref = x.astype(np.float64) @ (w.astype(np.float64) if v == "fp32"
                                              else quantize_rtn(w, v).dequantize())
                err = float(np.abs(y - ref).max() / np.abs(ref).max())
                timer = vm.time_evaluator("main", dev, number=args.number, repeat=1)
                runs[v] = (timer, call_args, sum(a.nbytes for _, a in params), err, [])
            for _ in range(args.rounds):
                for v in variants:
                    timer, call_args, *_rest, samples = runs[v]
                    samples.append(timer(*call_args).mean)
            base = statistics.median(runs["fp32"][4])
            for v in variants:
                _, _, nbytes, err, samples = runs[v]
                med = statistics.median(samples)
                q = np.percentile(samples, [10, 90])
                print(f"{f'{m}x{k}x{n}':>16} {v:>12} {med * 1e6:10.1f} {q[0] * 1e6:8.1f} {q[1] * 1e6:8.1f} "
                      f"{nbytes:10d} {nbytes / med / 1e9:7.1f} {base / med:7.2f}x {err:12.2e}")


if __name__ == "__main__":
    main()
