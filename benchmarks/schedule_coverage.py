#!/usr/bin/env python
"""Which fused kernels do edgecc's default schedules leave unscheduled, per target? (issue #7, item 3)

    python benchmarks/schedule_coverage.py                       # all models x host, arm-neon, riscv64-rvv
    python benchmarks/schedule_coverage.py --models resnet50-rw,mobilenet-v2 --targets arm-neon
    python benchmarks/schedule_coverage.py --json coverage.json  # also write every kernel's rule

Models: the benchmark suite's (minilm = all-MiniLM-L6-v2 seq 128, gpt-prefill, gpt-decode, resnet50-rw), a CNN
with depthwise convolutions (``mobilenet-v2``: MobileNetV2 written here in torch, random weights, 224x224; and
the onnx wheel's ``shufflenet-rw``, depthwise + grouped convolutions), and the tiny Llama through the LLM build
(``tiny-llama``: prefill 16 + decode over the KV cache, `edgecc.build_llm.build_llm_artifact`).

Nothing runs. Why not whole builds: which rule schedules a kernel is decided in the lowering pipeline
(`edgecc.ir_passes.pipeline.relax_pipeline`, the one `edgecc build` uses); codegen and linking add minutes per
model and target and change nothing here. So ONNX models go through `build_artifact`'s stages up to "lower"
(load, import, lift weight transforms: once per model; the build's weight rewrites, `rewrite_weights`, and the
pipeline: once per target), and the report is
`edgecc.schedules.schedule_report` of the lowered module. The LLM goes through its own build
(`build_llm_artifact`, with the KV-cache rewrite): in full for the first target, whose manifest's
``schedules.unscheduled`` is cross-checked against the lowered module's report, and up to lowering for the
others. Tuning databases are ignored (``EDGECC_TUNING_DIR`` points at an empty directory):
this is the default rules' coverage.

Printed per target: every PrimFunc no default rule scheduled, with its op family (from its name and block
names; a grouped conv is "depthwise" when its weight has one input channel per group) and the error of a
rule that matched but failed, if any; the kernels that only got the generic fallback (outer loops parallel,
nothing else); and the conv/matmul kernels that their dedicated rule did not take, so a generic rule
(reduction: parallel rows, serial window) did. Pre-scheduled kernels (fused attention, KV cache, int8 dot)
count as scheduled ("external" or their kernel's name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SUITE = ["minilm", "gpt-prefill", "gpt-decode", "resnet50-rw"]
EXTRA = ["mobilenet-v2", "shufflenet-rw", "tiny-llama"]
TARGETS = ["host", "arm-neon", "riscv64-rvv"]

# op family from the words of a kernel's name and block names, first match wins (TVM legalization names)
FAMILIES = [
    ("attention", ("attention",)),
    ("conv", ("conv",)),
    ("matmul", ("matmul", "dense", "einsum", "NT_matmul", "batch_matmul")),
    ("softmax", ("softmax",)),
    ("norm", ("norm",)),
    ("pool", ("pool",)),
    ("scan/sort", ("cumsum", "cumprod", "sort", "topk", "scan")),
    ("gather/scatter", ("take", "gather", "scatter", "index", "embedding")),
    ("reduction", ("_red", "sum", "mean", "max", "min", "prod", "argmax", "argmin", "variance")),
    ("layout", ("transpose", "reshape", "concat", "split", "strided_slice", "pad", "broadcast", "squeeze",
                "expand", "tile", "repeat", "flip", "resize", "layout")),
]
OP_PATTERN = {0: "elementwise", 1: "broadcast", 2: "injective", 3: "reduction", 4: "out-elementwise-fusable",
              5: "tuple", 8: "opaque"}


# ---------------------------------------------------------------------------------------------------- models


def mobilenet_v2(path: Path, seed: int = 0) -> Path:
    """MobileNetV2 (width 1.0, 224x224, 1000 classes) with seeded random weights, exported to ONNX (opset 17)."""
    import torch
    from torch import nn

    def cbr(i, o, k=3, s=1, g=1):
        return [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]

    class Inverted(nn.Module):
        def __init__(self, i, o, s, t):
            super().__init__()
            h = i * t
            layers = (cbr(i, h, 1) if t != 1 else []) + cbr(h, h, 3, s, g=h)  # depthwise 3x3
            layers += [nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o)]
            self.body = nn.Sequential(*layers)
            self.residual = s == 1 and i == o

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    torch.manual_seed(seed)
    layers, c = cbr(3, 32, 3, 2), 32
    for t, o, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for j in range(n):
            layers.append(Inverted(c, o, s if j == 0 else 1, t))
            c = o
    layers += cbr(c, 1280, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    net = nn.Sequential(*layers).eval()
    for m in net.modules():  # non-trivial BN statistics, so folding them is not a no-op
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, 224, 224), str(path), input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return path


def export_model(name: str, workdir: Path) -> Path:
    """The ONNX file (or, for an LLM, the export directory) of `name`; reuses $EDGECC_COVERAGE_MODELS/NAME.onnx."""
    cached = os.environ.get("EDGECC_COVERAGE_MODELS")
    if cached and (Path(cached) / f"{name}.onnx").exists():
        return Path(cached) / f"{name}.onnx"
    from edgecc.models import registry

    if name == "mobilenet-v2":
        return mobilenet_v2(workdir / "mobilenet-v2.onnx")
    if name in registry.LLMS:
        return registry.LLMS[name].export(workdir / name)
    return registry.get(name).export(workdir / f"{name}.onnx")


# ---------------------------------------------------------------------------------------------------- lowering


def lowered_onnx(onnx_path: Path, targets: list[str]) -> dict:
    """target -> lowered IRModule, for `edgecc build`'s pipeline (import and weight lifting shared by targets;
    the per-target weight rewrites of a build, `rewrite_weights`, applied for each: GEMV and conv weight panels,
    1x1 convs as GEMMs)."""
    from edgecc.build import lift_weight_transforms, rewrite_weights
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import bind_dims, read_signature
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.targets.registry import get_target

    model = load_model(onnx_path)
    imported = import_model(model, bind_dims(read_signature(model), {}))
    del model
    deploy_mod, _, named_weights = lift_weight_transforms(imported)
    out = {}
    for t in targets:
        spec = get_target(t)
        mod, _ = rewrite_weights(deploy_mod, named_weights, spec)
        out[t] = relax_pipeline(spec, with_schedules=True)(mod)
    return out


def lowered_llm(export_dir: Path, targets: list[str], workdir: Path) -> dict:
    """target -> (lowered IRModule, manifest's schedules.unscheduled or None) from the LLM build.

    The first target is built in full, so its manifest can be cross-checked; for the others the build stops
    right after lowering (codegen and link would add a minute each and change nothing here)."""
    import edgecc.schedules.base as base
    from edgecc.build_llm import build_llm_artifact

    class _Lowered(Exception):
        pass

    captured = []
    original = base.schedule_report
    stop = [False]

    def _capture(mod):  # build_llm_artifact reports on the lowered module: keep it
        captured.append(mod)
        if stop[0]:
            raise _Lowered
        return original(mod)

    out = {}
    base.schedule_report = _capture
    try:
        for i, t in enumerate(targets):
            stop[0] = i > 0
            try:
                result = build_llm_artifact(export_dir / "decode.onnx", workdir / f"llm-{t}", target=t,
                                            prefill=export_dir / "prefill.onnx", max_context=256)
                out[t] = (captured.pop(), result.manifest["schedules"]["unscheduled"])
            except _Lowered:
                out[t] = (captured.pop(), None)
    finally:
        base.schedule_report = original
    return out


# ---------------------------------------------------------------------------------------------------- report


def _region_tensor(region):
    return region.source  # TVM 0.27: TensorRegion.source is the tensor (was BufferRegion.buffer)


def blocks_of(func) -> list[tuple[str, list]]:
    """(name, shapes of the buffers it reads) of every block of `func`."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    out, todo = [], [sch.get_sblock("root")]
    while todo:
        for blk in sch.get_child_blocks(todo.pop()):
            stmt = sch.get(blk)
            out.append((stmt.name_hint, [[int(d) if hasattr(d, "value") else str(d) for d in _region_tensor(r).shape]
                                         for r in stmt.reads]))
            todo.append(blk)
    return out


def op_family(name: str, func) -> str:
    try:
        blocks = blocks_of(func)
    except Exception:  # noqa: BLE001 - a kernel the schedule API cannot open: name only
        blocks = []
    for blk, reads in blocks:  # TVM legalizes every grouped conv2d to group_conv2d_nchw
        if "group_conv" in blk.lower():
            weight = reads[1] if len(reads) > 1 else None
            return "depthwise conv" if weight and len(weight) == 4 and weight[1] == 1 else "grouped conv"
    low = " ".join([name, *(b for b, _ in blocks)]).lower()
    for family, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return family
    attrs = func.attrs or {}
    pattern = int(attrs["op_pattern"]) if "op_pattern" in attrs else None
    return OP_PATTERN.get(pattern, "elementwise")


# families with a dedicated default rule: a kernel of one of them that another rule took is a coverage gap too
DEDICATED = {"conv": "conv2d", "grouped conv": "conv2d", "depthwise conv": "conv2d", "matmul": "matmul"}


def kernel_rows(mod) -> list[dict]:
    from tvm import tirx

    from edgecc.schedules import schedule_report

    report = schedule_report(mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    rows = []
    for name, rule in sorted(report.items()):
        status = "none" if rule.startswith("none") else rule.split(" ")[0]
        error = rule[len("none ("):-1] if rule.startswith("none (") else None
        rows.append({"kernel": name, "rule": status, "family": op_family(name, funcs[name]), "error": error})
    return rows


def print_target(target: str, per_model: dict[str, list[dict]]) -> None:
    total = sum(len(r) for r in per_model.values())
    unsched = [(m, r) for m, rows in per_model.items() for r in rows if r["rule"] == "none"]
    fallback = [(m, r) for m, rows in per_model.items() for r in rows if r["rule"] == "fallback"]
    generic = [(m, r) for m, rows in per_model.items() for r in rows
               if r["family"] in DEDICATED and r["rule"] in ("reduction", "elementwise")]
    print(f"\n== {target}: {total} kernels, {len(unsched)} unscheduled, {len(fallback)} fallback-only, "
          f"{len(generic)} conv/matmul kernels on a generic rule")
    for m, rows in per_model.items():
        rules = Counter(r["rule"] for r in rows)
        print(f"   {m:<14} {len(rows):>3} kernels: " + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
    families = Counter((r["family"], r["rule"]) for rows in per_model.values() for r in rows)
    print("   family -> rule: " + ", ".join(f"{f}->{r} {n}" for (f, r), n in sorted(families.items())))
    for title, items in (("unscheduled (no default rule)", unsched), ("fallback only (outer loops parallel)", fallback),
                         ("conv/matmul kernels their dedicated rule did not take", generic)):
        print(f"   {title}: {len(items) or 'none'}")
        for m, r in items:
            print(f"     {m:<14} {r['family']:<15} {r['rule']:<11} {r['kernel'][:70]}"
                  + (f"   [{r['error']}]" if r["error"] else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SUITE + EXTRA), help="comma list (default: %(default)s)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma list (default: %(default)s)")
    ap.add_argument("--json", help="write every kernel's rule and family per target and model to this file")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    t_start = time.time()
    results: dict[str, dict[str, list[dict]]] = defaultdict(dict)  # target -> model -> kernel rows
    mismatches = []
    with tempfile.TemporaryDirectory(prefix="edgecc_coverage_") as tmp:
        tmp = Path(tmp)
        (tmp / "no-tuning").mkdir()
        os.environ["EDGECC_TUNING_DIR"] = str(tmp / "no-tuning")  # default rules only
        for name in models:
            t0 = time.time()
            path = export_model(name, tmp)
            if path.is_dir():  # an LLM export: prefill.onnx + decode.onnx
                for t, (mod, manifest_unscheduled) in lowered_llm(path, targets, tmp).items():
                    rows = kernel_rows(mod)
                    results[t][name] = rows
                    mine = sorted(r["kernel"] for r in rows if r["rule"] == "none")
                    if manifest_unscheduled is not None and mine != sorted(manifest_unscheduled):
                        mismatches.append(f"{name}/{t}: manifest {manifest_unscheduled} vs report {mine}")
            else:
                for t, mod in lowered_onnx(path, targets).items():
                    results[t][name] = kernel_rows(mod)
            print(f"{name}: lowered for {', '.join(targets)} in {time.time() - t0:.0f} s", flush=True)

    for t in targets:
        print_target(t, results[t])
    for m in mismatches:
        print(f"MISMATCH {m}")
    print(f"\nwall {time.time() - t_start:.0f} s; load avg {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
