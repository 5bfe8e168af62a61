"""Expected-failure lists: `edgecc/conformance/expected_failures/<target>.txt`, one case per line.

    test_loop11  # import: no converter for Loop
    # comment lines and blank lines are ignored

A listed case that fails is an *expected failure* (whatever the stage); a listed case that passes is an
*unexpected pass*, and a failing case not listed is an *unexpected failure*: both fail `edgecc validate`, so
the list has to be edited (or regenerated with `--update-expected`) whenever coverage changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LIST_DIR = Path(__file__).parent / "expected_failures"

PASS, FAIL, XFAIL, XPASS = "pass", "fail", "expected-fail", "unexpected-pass"
STATUSES = (PASS, XFAIL, FAIL, XPASS)

_HEADER = """\
# Expected failures of `edgecc validate --target {target}` (ONNX node conformance cases).
# One case per line: `case_name  # stage: reason`; stage is import, build, run or numerics (see
# edgecc/conformance/worker.py). A listed case that passes fails the run (unexpected pass): remove it.
# Regenerate with: edgecc validate --target {target} --update-expected  (keeps entries of cases not selected by -k)
"""


@dataclass(frozen=True)
class Expected:
    name: str
    stage: str
    reason: str


def list_path(target: str) -> Path:
    return LIST_DIR / f"{target}.txt"


def read_expected(path: Path) -> dict[str, Expected]:
    out: dict[str, Expected] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, note = line.partition("#")
        stage, sep, reason = note.strip().partition(":")
        if not sep:
            stage, reason = "", note.strip()
        out[name.strip()] = Expected(name.strip(), stage.strip(), reason.strip())
    return out


def classify(result: dict, expected: dict[str, Expected]) -> str:
    listed = result["name"] in expected
    if result["outcome"] == "pass":
        return XPASS if listed else PASS
    return XFAIL if listed else FAIL


def write_expected(path: Path, target: str, results: list[dict], selected: set[str] | None = None) -> int:
    """Rewrite the list from `results`; entries of cases outside `selected` are kept. Returns the count."""
    keep = {n: e for n, e in read_expected(path).items() if selected is not None and n not in selected}
    for r in results:
        if r["outcome"] != "pass":
            reason = " ".join(str(r.get("reason") or "").split())
            keep[r["name"]] = Expected(r["name"], r.get("stage") or "", reason)
    width = max((len(n) for n in keep), default=0)
    lines = [_HEADER.format(target=target)]
    for name in sorted(keep):
        e = keep[name]
        lines.append(f"{name.ljust(width)}  # {e.stage}: {e.reason}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    return len(keep)
