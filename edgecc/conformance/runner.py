"""Run many cases in worker processes, each case with a time limit, surviving crashes.

Each worker is a `spawn`ed process (TVM does not survive `fork` well) that imports TVM once and then runs
cases one at a time as the parent sends them. Before each stage the worker tells the parent which stage it
entered; when a case exceeds its time limit, or the worker dies (a segfault in a kernel, an abort in TVM, the
OOM killer), the parent records the case as failed in that stage ("timeout after N s" / "worker crashed:
SIGSEGV"), kills or reaps the worker, starts a fresh one and carries on. Workers are also replaced every
`recycle_after` cases to bound memory growth.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Iterable

from edgecc.conformance.cases import Case


def _worker_main(conn, target: str, strict: bool, converters: bool, log_path: str) -> None:
    os.environ["TVM_NUM_THREADS"] = "1"  # the pool runs -j processes side by side
    # TVM and its importer print warnings straight to fds 1/2: keep them out of the progress bar.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from edgecc.conformance.worker import run_case
    from edgecc.frontend import converters as edgecc_converters

    edgecc_converters.set_enabled(converters)
    try:
        from edgecc.runtime_bridge.host import set_num_threads

        set_num_threads(1)
    except Exception:  # noqa: BLE001 - thread setup is an optimisation only
        pass
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        result = run_case(job, target, strict, report_stage=lambda s: conn.send(("stage", s)))
        conn.send(("done", result))


@dataclass
class _Slot:
    proc: mp.Process
    conn: object
    case: Case | None = None
    stage: str = "import"
    started: float = 0.0
    done: int = 0
    ready: bool = False


def _signal_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_cases(cases: Iterable[Case], target: str, jobs: int = 1, timeout_s: float = 180.0,
              strict: bool = False, converters: bool = True, recycle_after: int = 150,
              on_result: Callable[[dict], None] | None = None, log_path: str | None = None) -> list[dict]:
    """Run `cases` for `target` on `jobs` worker processes; returns one result dict per case, in order.

    `converters=False` disables edgecc's own converters (TVM's importer alone, for before/after counts).
    The workers' stdout/stderr (TVM warnings) go to `log_path` (default: discarded).
    """
    cases = list(cases)
    if not cases:
        return []
    ctx = mp.get_context("spawn")
    jobs = max(1, min(jobs, len(cases)))
    pending = list(reversed(cases))
    results: dict[str, dict] = {}
    slots: list[_Slot] = []
    startup_failures = 0

    def start() -> _Slot:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, target, strict, converters, log_path or os.devnull), daemon=True)
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def stop(slot: _Slot, kill: bool) -> None:
        if kill and slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(timeout=10)
        try:
            slot.conn.close()
        except OSError:  # pragma: no cover
            pass

    def finish(slot: _Slot, result: dict) -> None:
        results[slot.case.name] = result
        slot.case = None
        slot.done += 1
        if on_result:
            on_result(result)

    def failed(case: Case, stage: str, reason: str, seconds: float) -> dict:
        return {"name": case.name, "op": case.op, "outcome": "fail", "stage": stage, "reason": reason,
                "frozen": [], "outputs": [], "offloaded": None, "seconds": round(seconds, 3)}

    def dispatch(slot: _Slot) -> None:
        if pending and slot.ready and slot.case is None:
            slot.case = pending.pop()
            slot.stage, slot.started = "import", time.monotonic()
            slot.conn.send({"name": slot.case.name, "dir": str(slot.case.dir), "op": slot.case.op})

    try:
        slots = [start() for _ in range(jobs)]
        while len(results) < len(cases):
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot.case is not None and now - slot.started > timeout_s:
                    finish(slot, failed(slot.case, slot.stage, f"timeout after {timeout_s:.0f} s", now - slot.started))
                    stop(slot, kill=True)
                    slots[i] = start()
            conns = {slot.conn: slot for slot in slots}
            for conn in wait(list(conns), timeout=1.0):
                slot = conns[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    slot.proc.join(timeout=10)
                    if not slot.ready:
                        startup_failures += 1
                        if startup_failures > 3:
                            raise RuntimeError("conformance workers die on start-up "
                                               f"({_signal_name(slot.proc.exitcode)}); run one case with -j 1")
                    if slot.case is not None:
                        finish(slot, failed(slot.case, slot.stage,
                                            f"worker crashed: {_signal_name(slot.proc.exitcode)}",
                                            time.monotonic() - slot.started))
                    stop(slot, kill=True)
                    slots[slots.index(slot)] = start()
                    continue
                if kind == "ready":
                    slot.ready, startup_failures = True, 0
                elif kind == "stage":
                    slot.stage = payload
                elif kind == "done":
                    finish(slot, payload)
                    if slot.done >= recycle_after and pending:
                        slot.conn.send(None)
                        stop(slot, kill=False)
                        slots[slots.index(slot)] = start()
            for slot in slots:
                dispatch(slot)
            if not pending and all(s.case is None for s in slots) and len(results) < len(cases):
                break  # pragma: no cover - defensive: nothing left to wait for
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, BrokenPipeError, ValueError):
                pass
        for slot in slots:
            stop(slot, kill=False)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(timeout=5)
    return [results[c.name] for c in cases if c.name in results]
