#!/usr/bin/env python3
"""Build and verify the models edgecc is tested on, for several targets, and print a markdown table.

    python scripts/verify_models.py --targets host,arm-neon
    python scripts/verify_models.py --models minilm,resnet50-rw --targets host

One row per (model, target): build time, and per output the max abs error and cosine against
onnxruntime on the same inputs (`edgecc verify`'s comparison; tolerances in
edgecc/runtime_bridge/tolerances.py). The light CNNs use their `-rw` variants (seeded random weights):
the shipped files have constant weights, for which every runtime prints the same uniform softmax.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = ["minilm", "resnet50-rw", "densenet121-rw", "inception-v1-rw", "inception-v2-rw", "alexnet-rw",
                  "squeezenet-rw", "shufflenet-rw", "vgg19-rw", "zfnet512-rw"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--targets", default="host,arm-neon")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS
    from edgecc.runtime_bridge.verify import verify

    rows = ["| model | target | build s | verify s | output | max abs err | cosine | result |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="edgecc-verify-") as tmp:
        for name in args.models.split(","):
            entry = MODELS[name]
            onnx_path = entry.export(Path(tmp) / f"{name}.onnx")
            feeds = entry.feeds(seed=args.seed)
            for target in args.targets.split(","):
                out = Path(tmp) / f"{name}.{target}"
                t0 = time.perf_counter()
                build_artifact(onnx_path, out, target=target)
                t1 = time.perf_counter()
                reports, _ = verify(out, onnx_path, feeds)
                t2 = time.perf_counter()
                for r in reports:
                    failed += not r.passed
                    rows.append(f"| {name} | {target} | {t1 - t0:.1f} | {t2 - t1:.1f} | {r.name} | "
                                f"{r.max_abs_err:.2e} | {r.cosine:.8f} | {'PASS' if r.passed else 'FAIL'} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
