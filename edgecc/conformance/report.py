"""report.json and report.md for one `edgecc validate` run.

report.json:

    {"target", "started", "wall_s", "versions", "options", "cases_dir", "expected_list",
     "totals":   {"cases", "pass", "expected-fail", "fail", "unexpected-pass", "passed", "pass_rate"},
     "by_stage": {"import": n, "build": n, "run": n, "numerics": n},        # failing cases, by stage
     "ops":      {op: {"cases", "pass", "expected-fail", "fail", "unexpected-pass", "by_stage"}},
     "cases":    [{"name", "op", "status", "outcome", "stage", "reason", "expected": {stage, reason} | null,
                   "frozen": [inputs frozen as initializers], "seconds",
                   "outputs": [{"data_set", "output", "dtype", "shape", "max_abs_err", "max_rel_err",
                                "cosine", "atol", "rtol", "min_cosine", "passed", "problem"?}]}]}

`status` is one of pass / expected-fail / fail (unexpected failure) / unexpected-pass; `passed` counts cases
whose outcome was a pass (pass + unexpected-pass) and `pass_rate` is passed / cases.

Vendor targets with BYOC (`TargetSpec.byoc`, see edgecc/targets/byoc.py) add where each op ran: every case
has `"offloaded"` (null for targets without BYOC and for cases that did not build; else the vendor patterns
that took part of the case, [] = all on the CPU), each op gets `"offload": {"offloaded", "cpu", "not_built",
"patterns"}` (case counts) and the report an `"offload"` total; report.md an "Offload" table.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from edgecc.conformance.expected import FAIL, PASS, STATUSES, XFAIL, XPASS, Expected, classify
from edgecc.conformance.worker import STAGES


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for dist in ("edgecc", "apache-tvm", "apache-tvm-ffi", "onnx", "numpy"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = "unknown"
    return out


def build_report(results: list[dict], expected: dict[str, Expected], target: str, options: dict,
                 wall_s: float, cases_dir: str = "", expected_list: str = "") -> dict:
    cases = []
    for r in results:
        e = expected.get(r["name"])
        cases.append({**r, "status": classify(r, expected),
                      "expected": {"stage": e.stage, "reason": e.reason} if e else None})
    totals = Counter(c["status"] for c in cases)
    by_stage = Counter(c["stage"] for c in cases if c["outcome"] != "pass")
    ops: dict[str, dict] = defaultdict(lambda: {"cases": 0, **{s: 0 for s in STATUSES}, "by_stage": {}})
    for c in cases:
        o = ops[c["op"]]
        o["cases"] += 1
        o[c["status"]] += 1
        if c["outcome"] != "pass":
            o["by_stage"][c["stage"]] = o["by_stage"].get(c["stage"], 0) + 1
    passed = totals[PASS] + totals[XPASS]
    offload = _offload_counts(cases, ops)
    return {
        "target": target,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - wall_s)),
        "wall_s": round(wall_s, 1),
        "versions": _versions(),
        "options": options,
        "cases_dir": cases_dir,
        "expected_list": expected_list,
        "totals": {"cases": len(cases), **{s: totals[s] for s in STATUSES}, "passed": passed,
                   "pass_rate": round(passed / len(cases), 4) if cases else 0.0},
        "by_stage": {s: by_stage[s] for s in STAGES},
        "ops": dict(sorted(ops.items())),
        **({"offload": offload} if offload else {}),
        "cases": cases,
    }


def _offload_counts(cases: list[dict], ops: dict) -> dict | None:
    """Per op and in total: cases offloaded (at least one op in the vendor library), all on the CPU, not
    built. None unless some case was built for a BYOC target."""
    if not any(c.get("offloaded") is not None for c in cases):
        return None
    total = {"offloaded": 0, "cpu": 0, "not_built": 0}
    for c in cases:
        o = ops[c["op"]].setdefault("offload", {"offloaded": 0, "cpu": 0, "not_built": 0, "patterns": []})
        where = c.get("offloaded")
        key = "not_built" if where is None else "offloaded" if where else "cpu"
        o[key] += 1
        total[key] += 1
        o["patterns"] = sorted(set(o["patterns"]) | set(where or []))
    return total


def unexpected(report: dict) -> list[dict]:
    return [c for c in report["cases"] if c["status"] in (FAIL, XPASS)]


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(report: dict) -> str:
    t = report["totals"]
    lines = [
        f"# ONNX node conformance: target `{report['target']}`",
        "",
        f"{report['started']}, {report['wall_s']} s wall, options `{json.dumps(report['options'])}`, "
        f"versions `{json.dumps(report['versions'])}`.",
        "",
        "| cases | pass | expected-fail | **unexpected fail** | **unexpected pass** | pass rate |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {t['cases']} | {t[PASS]} | {t[XFAIL]} | {t[FAIL]} | {t[XPASS]} | {100 * t['pass_rate']:.1f}% |",
        "",
        "Failing cases by stage: " + ", ".join(f"{s} {n}" for s, n in report["by_stage"].items()) + ".",
        "",
    ]
    bad = unexpected(report)
    if bad:
        lines += ["## Unexpected results", "", "| case | op | status | stage | reason |", "| --- | --- | --- | --- | --- |"]
        for c in bad:
            reason = c["reason"] if c["status"] == FAIL else f"passes; listed as: {(c['expected'] or {}).get('reason')}"
            lines.append(f"| {c['name']} | {_md_escape(c['op'])} | {c['status']} | {c['stage'] or ''} | "
                         f"{_md_escape(reason)} |")
        lines.append("")
    lines += ["## Per op", "", "| op | cases | pass | expected-fail | unexpected fail | unexpected pass | failing stages |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    ops = sorted(report["ops"].items(), key=lambda kv: (-(kv[1][XFAIL] + kv[1][FAIL]), kv[0]))
    for op, o in ops:
        stages = ", ".join(f"{s} {n}" for s, n in sorted(o["by_stage"].items()))
        lines.append(f"| {_md_escape(op)} | {o['cases']} | {o[PASS]} | {o[XFAIL]} | {o[FAIL]} | {o[XPASS]} | {stages} |")
    lines += _offload_markdown(report)
    lines += ["", "## Failing cases", "", "| case | op | status | stage | reason | worst error |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in report["cases"]:
        if c["outcome"] == "pass":
            continue
        worst = ""
        figs = [f for f in c.get("outputs", []) if "max_abs_err" in f]
        if figs:
            f = max(figs, key=lambda f: f["max_abs_err"])
            worst = f"max abs {f['max_abs_err']:.3g}, cos {f['cosine']:.5f}"
        lines.append(f"| {c['name']} | {_md_escape(c['op'])} | {c['status']} | {c['stage']} | "
                     f"{_md_escape(c['reason'] or '')} | {worst} |")
    return "\n".join(lines) + "\n"


def _offload_markdown(report: dict) -> list[str]:
    """The Offload section (BYOC targets only): per op, where its cases ran, beside their numerics."""
    total = report.get("offload")
    if not total:
        return []
    lines = ["", "## Offload (BYOC)", "",
             f"Cases with ops in the vendor library: {total['offloaded']}; all on the CPU: {total['cpu']}; "
             f"not built: {total['not_built']}.", "",
             "| op | cases | offloaded | CPU fallback | not built | pass | patterns |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    cpu_only = []
    for op, o in sorted(report["ops"].items()):
        f = o.get("offload")
        if f is None:
            continue
        if not f["offloaded"]:
            cpu_only.append(op)
            continue
        lines.append(f"| {_md_escape(op)} | {o['cases']} | {f['offloaded']} | {f['cpu']} | {f['not_built']} | "
                     f"{o[PASS] + o[XPASS]} | {', '.join(f['patterns'])} |")
    if cpu_only:
        lines += ["", f"Ops with no offloaded case (CPU fallback, or not built), {len(cpu_only)}: "
                  + ", ".join(_md_escape(op) for op in cpu_only) + "."]
    return lines


def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "report.json", out_dir / "report.md"
    jpath.write_text(json.dumps(_json_safe(report), indent=1) + "\n", encoding="utf-8")
    mpath.write_text(write_markdown(report), encoding="utf-8")
    return jpath, mpath
