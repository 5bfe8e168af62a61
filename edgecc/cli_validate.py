"""`edgecc validate`: the ONNX node conformance suite for a target (registered on `edgecc.cli.main`).

Progress (a rich progress bar) goes to stderr; the summary and the unexpected results to stdout.
Exit codes: 0 when every case matched the target's expected-failure list, 1 on any unexpected failure or
unexpected pass (or when no case was selected), 2 on a user error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgecc.cli import EXIT_CHECK_FAILED, err, out, user_errors
from edgecc.errors import EdgeccError


@click.command()
@click.option("-t", "--target", default="host", show_default=True, help="Target to build and run the cases for.")
@click.option("-k", "pattern", default=None, metavar="PATTERN",
              help="Select cases: comma-separated substrings of the case name or exact op names "
                   "(e.g. -k relu,softmax,not:expanded).")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Cases run in parallel (one worker process each).")
@click.option("-o", "--output", "out_dir", default="conformance-report", show_default=True,
              type=click.Path(path_type=Path), help="Directory for report.json and report.md.")
@click.option("--update-expected", is_flag=True,
              help="Rewrite the target's expected-failure list from this run (with -k: only the selected cases).")
@click.option("--timeout", "timeout_s", default=None, type=float,
              help="Seconds per case [default: 180 on host, 600 under emulation].")
@click.option("--strict", is_flag=True, help="Freeze no shape/axes inputs (see edgecc/conformance/cases.py).")
@click.option("--cases", "cases_path", default=None, type=click.Path(path_type=Path),
              help="Directory of node cases (default: the onnx wheel's, else generated into the cache).")
@click.option("--expected", "expected_path", default=None, type=click.Path(path_type=Path),
              help="Expected-failure list [default: edgecc/conformance/expected_failures/TARGET.txt].")
@click.option("--no-converters", is_flag=True, hidden=True,
              help="Disable edgecc's own converters (TVM's importer alone; for before/after counts).")
@user_errors
def validate(target, pattern, jobs, out_dir, update_expected, timeout_s, strict, cases_path, expected_path,
             no_converters):
    """Run the ONNX node conformance cases through edgecc for a target and report pass/fail per op."""
    from edgecc.conformance import validate as run_validate
    from edgecc.conformance.expected import FAIL, XPASS
    from edgecc.targets.registry import get_target

    spec = get_target(target)
    if spec.device != "cpu":
        raise EdgeccError(f"target '{target}' cannot run here", "validate a CPU target (host, arm-neon, ...)")
    status = spec.sdk_status()
    if not status.can_run:
        raise EdgeccError(f"target '{target}' cannot run on this machine ({status.how_it_runs})",
                          status.install_hint or "install its toolchain and emulator")
    if timeout_s is None:
        timeout_s = 600.0 if spec.is_cross else 180.0

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False)
    counts = {"pass": 0, "fail": 0}
    task = progress.add_task(f"validate {target}", total=None, info="")

    def on_start(cases):
        progress.update(task, total=len(cases))

    def on_result(result):
        counts["pass" if result["outcome"] == "pass" else "fail"] += 1
        progress.update(task, advance=1, info=f"pass {counts['pass']}  fail {counts['fail']}  {result['name']}")

    with progress:
        report, paths = run_validate(spec.name, pattern=pattern, jobs=jobs, out_dir=out_dir,
                                     update_expected=update_expected, timeout_s=timeout_s, strict=strict,
                                     converters=not no_converters, cases=cases_path, expected_list=expected_path,
                                     on_start=on_start, on_result=on_result)
    t = report["totals"]
    out.print(f"target {target}: {t['cases']} cases, {t['pass']} pass, {t['expected-fail']} expected-fail, "
              f"{t[FAIL]} unexpected fail, {t[XPASS]} unexpected pass ({100 * t['pass_rate']:.1f}% pass) "
              f"in {report['wall_s']} s")
    out.print("failing by stage: " + ", ".join(f"{s} {n}" for s, n in report["by_stage"].items()))
    for c in report["cases"]:
        if c["status"] == FAIL:
            out.print(f"  UNEXPECTED FAIL  {c['name']} ({c['op']}) {c['stage']}: {c['reason']}", markup=False)
        elif c["status"] == XPASS:
            out.print(f"  UNEXPECTED PASS  {c['name']} ({c['op']})", markup=False)
    if paths:
        out.print(f"wrote {paths[0]} and {paths[1]}")
    if update_expected:
        out.print(f"updated {report['expected_list']}")
    if t["cases"] == 0:
        err.print("no case matched" + (f" -k {pattern}" if pattern else ""))
        sys.exit(EXIT_CHECK_FAILED)
    if (t[FAIL] or t[XPASS]) and not update_expected:
        sys.exit(EXIT_CHECK_FAILED)
