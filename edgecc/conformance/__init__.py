"""ONNX node conformance for a target: `edgecc validate`.

Every case of `onnx.backend.test`'s node suite (see `cases.py` for where the data comes from and which
shape-like inputs are frozen) goes through edgecc's own frontend and build for the target, in a pool of
worker processes (`runner.py`: per-case timeout, crash isolation), and each output is compared with the
case's expected output under `edgecc.runtime_bridge.tolerances` (`worker.py`). Results are matched against
the target's expected-failure list (`expected.py`) and written as report.json + report.md (`report.py`).

    from edgecc.conformance import validate
    report, paths = validate("host", pattern="relu,softmax", jobs=2, out_dir="conformance-report")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from edgecc.conformance.cases import Case, cases_dir, discover
from edgecc.conformance.expected import list_path, read_expected, write_expected
from edgecc.conformance.report import build_report, unexpected, write_report
from edgecc.conformance.runner import run_cases

__all__ = ["Case", "cases_dir", "discover", "validate", "unexpected", "list_path"]


def validate(target: str, pattern: str | None = None, jobs: int = 1, out_dir: str | Path | None = None,
             update_expected: bool = False, timeout_s: float = 180.0, strict: bool = False,
             converters: bool = True, cases: str | Path | None = None, expected_list: str | Path | None = None,
             on_start: Callable[[list[Case]], None] | None = None,
             on_result: Callable[[dict], None] | None = None) -> tuple[dict, tuple[Path, Path] | None]:
    """Run the (selected) cases for `target`; returns the report dict and the written report paths."""
    from edgecc.targets.registry import get_target

    spec = get_target(target)  # an unknown target is a user error before any work
    directory = cases_dir(cases)
    selected = discover(directory, pattern)
    if on_start:
        on_start(selected)
    path = Path(expected_list) if expected_list else list_path(spec.name)
    if not expected_list and "expected_failures" in spec.extra:  # a vendor plugin ships its target's list
        path = Path(spec.extra["expected_failures"])
    log = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = str(Path(out_dir) / "workers.log")
        Path(log).write_text("")
    t0 = time.perf_counter()
    results = run_cases(selected, spec.name, jobs=jobs, timeout_s=timeout_s, strict=strict,
                        converters=converters, on_result=on_result, log_path=log)
    wall = time.perf_counter() - t0
    if update_expected:
        write_expected(path, spec.name, results, selected={c.name for c in selected} if pattern else None)
    options = {"pattern": pattern, "jobs": jobs, "timeout_s": timeout_s, "strict": strict,
               "converters": converters}
    report = build_report(results, read_expected(path), spec.name, options, wall, str(directory), str(path))
    paths = write_report(report, out_dir) if out_dir is not None else None
    return report, paths
