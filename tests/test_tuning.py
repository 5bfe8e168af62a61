"""`edgecc tune`: MetaSchedule tuning into a database, builds that apply it, resume, time budget, RPC.

The model is one 64x64x64 matmul + relu (torch -> ONNX): a single fused kernel, so a handful of trials
is enough to get records, and every test stays within tens of seconds on 2 loaded cores.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from edgecc.errors import EdgeccError
from edgecc.schedules.tuning import APPLY_MARGIN, CONFIRM_PLAUSIBLE, CONFIRM_ROUNDS

TRIALS = 8


@pytest.fixture(scope="module")
def matmul_relu(tmp_path_factory) -> Path:
    import torch

    class MatmulRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)

        def forward(self, x):
            return torch.relu(x @ self.w)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tune_model") / "matmul_relu.onnx"
    torch.onnx.export(MatmulRelu().eval(), (torch.randn(64, 64),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def tuned_db(matmul_relu, tmp_path_factory):
    """(database dir, report) after tuning the model for the host with TRIALS trials."""
    from edgecc.schedules.tuning import tune_model

    db = tmp_path_factory.mktemp("tune_db") / "db"
    events = []
    report = tune_model(matmul_relu, "host", trials=TRIALS, database_dir=db, progress=events.append, seed=1)
    return db, report, events


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)}


def _best_record_hash(db: Path, model: Path) -> str:
    """Structural hash of the schedule a build would replay from `db` for the model's one tuned kernel."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from edgecc.targets.registry import get_target

    database = ms.database.JSONDatabase(work_dir=str(db), allow_missing=False)
    [workload] = {str(tvm_ffi.structural_hash(r.workload.mod)): r.workload
                  for r in database.get_all_tuning_records()}.values()
    sch = database.query_schedule(workload.mod, get_target("host").tvm(), "main")
    return str(tvm_ffi.structural_hash(sch.mod))


def _onnxruntime(model: Path, feeds) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _records(db: Path) -> list[str]:
    return [line for line in (db / "database_tuning_record.json").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ cheap


def test_default_database_dir_is_per_target_and_honours_edgecc_cache(monkeypatch, tmp_path):
    from edgecc.schedules.tuning import default_database_dir
    from edgecc.targets.registry import get_target

    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGECC_TUNING_DIR", raising=False)
    host = default_database_dir(get_target("host"))
    neon = default_database_dir(get_target("arm-neon"))
    assert host.parent == tmp_path / "tuning" and neon.parent == tmp_path / "tuning"
    assert host.name.startswith("host-") and neon.name.startswith("arm-neon-") and host != neon
    assert default_database_dir(get_target("host")) == host  # stable


def test_cross_target_without_rpc_is_a_clear_error(matmul_relu):
    from edgecc.schedules.tuning import tune_model

    with pytest.raises(EdgeccError, match="--rpc HOST:PORT --key KEY"):
        tune_model(matmul_relu, "arm-neon", trials=2)
    with pytest.raises(EdgeccError, match="bad --rpc"):
        tune_model(matmul_relu, "host", trials=2, rpc="nohost", rpc_key="k")
    with pytest.raises(EdgeccError, match="--rpc needs --key"):
        tune_model(matmul_relu, "host", trials=2, rpc="127.0.0.1:9190")


def test_database_of_another_target_is_refused(tuned_db, tmp_path):
    from edgecc.schedules.tuning import apply_database_pass, resolve_database_dir
    from edgecc.targets.registry import get_target

    db, _report, _events = tuned_db
    spec = get_target("x86-avx2")
    assert resolve_database_dir(spec, db) == db
    with pytest.raises(EdgeccError, match="measured for target 'host'"):
        apply_database_pass(spec, db)
    with pytest.raises(EdgeccError, match="does not exist"):
        resolve_database_dir(spec, tmp_path / "nothing-here")


# --------------------------------------------------------------------------------- tune and build


def test_tune_writes_records_and_build_applies_them(tuned_db, matmul_relu, tmp_path, monkeypatch):
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact
    from edgecc.schedules.tuning import default_database_dir
    from edgecc.targets.registry import get_target

    db, report, events = tuned_db
    assert report.trials_done == TRIALS and report.stopped_by == "trials"
    assert report.records_before == 0 and report.records_after == TRIALS == len(_records(db))
    [task] = report.tasks
    assert task.name.startswith("fused_matmul") and task.trials == TRIALS
    assert task.errors < TRIALS and task.best_ms is not None and task.best_ms > 0
    meta = json.loads((db / "edgecc_tuning.json").read_text())
    assert meta["target"]["name"] == "host"
    assert [e.trials_done for e in events if e.phase == "tune"] == list(range(1, TRIALS + 1))
    assert events[-1].phase == "done"

    [default_ms] = [t.default_ms for t in report.tasks]
    assert default_ms is not None and default_ms > 0
    baselines = json.loads((db / "edgecc_baselines.json").read_text())
    assert [b["task"] for b in baselines.values()] == [task.name]
    [baseline] = baselines.values()
    # A plausible winner was re-timed side by side with the default; the verdict is stored with both hashes.
    plausible = task.best_ms < default_ms * CONFIRM_PLAUSIBLE
    assert ("confirmed" in baseline) == plausible
    if plausible:
        conf = baseline["confirmed"]
        assert conf["rounds"] == CONFIRM_ROUNDS and conf["default_hash"] == baseline["default_hash"]
        assert conf["applies"] == (conf["tuned_ms"] < conf["default_ms"] * APPLY_MARGIN) == task.confirmed
    beats = bool(task.confirmed)
    assert report.beats_default == ([task.name] if beats else [])

    # The build applies a record only where the paired re-timing found it faster than the default ...
    feeds = _feeds()
    expected = _onnxruntime(matmul_relu, feeds)
    result = build_artifact(matmul_relu, tmp_path / "guarded", target="host", tuning_db=db)
    tuning = result.manifest["schedules"]["tuning_db"]
    assert tuning["applied"] and tuning["database"] == db.name and len(tuning["records_sha256"]) == 64
    assert (tuning["tuned_functions"], tuning["default_faster"]) == ((1, 0) if beats else (0, 1))
    assert str(tmp_path) not in json.dumps(result.manifest)
    np.testing.assert_allclose(load_artifact(tmp_path / "guarded").run(feeds)["y"], expected, atol=1e-4, rtol=0)

    # ... flipping the stored verdict flips what the build does (the build re-times nothing itself) ...
    flipped = tmp_path / "flipped-db"
    shutil.copytree(db, flipped)
    key = next(iter(baselines))
    if plausible:
        baselines[key]["confirmed"]["applies"] = not beats
    else:  # fabricate a confirmation for the best record: only its schedule hash ties it to the record
        baselines[key]["confirmed"] = {"applies": True, "tuned_hash": _best_record_hash(db, matmul_relu),
                                       "default_hash": baseline["default_hash"], "default_ms": 1.0,
                                       "tuned_ms": 0.5, "rounds": CONFIRM_ROUNDS}
    (flipped / "edgecc_baselines.json").write_text(json.dumps(baselines))
    result = build_artifact(matmul_relu, tmp_path / "flipped", target="host", tuning_db=flipped)
    want = (0, 1) if (plausible and beats) else (1, 0)
    flipped_tuning = result.manifest["schedules"]["tuning_db"]
    assert (flipped_tuning["tuned_functions"], flipped_tuning["default_faster"]) == want
    np.testing.assert_allclose(load_artifact(tmp_path / "flipped").run(feeds)["y"], expected, atol=1e-4, rtol=0)

    # ... and without baselines (a plain MetaSchedule database) it applies the best record as it is.
    plain = tmp_path / "plain-db"
    shutil.copytree(db, plain)
    (plain / "edgecc_baselines.json").unlink()
    result = build_artifact(matmul_relu, tmp_path / "tuned", target="host", tuning_db=plain)
    assert result.manifest["schedules"]["tuning_db"]["tuned_functions"] == 1
    got = load_artifact(tmp_path / "tuned").run(feeds)["y"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    # Later builds pick the target's default database up without being told.
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGECC_TUNING_DIR", raising=False)
    default = default_database_dir(get_target("host"))
    shutil.copytree(plain, default)
    result = build_artifact(matmul_relu, tmp_path / "auto", target="host")
    auto = result.manifest["schedules"]["tuning_db"]
    assert auto["applied"] and auto["database"] == default.name and auto["tuned_functions"] == 1
    np.testing.assert_allclose(load_artifact(tmp_path / "auto").run(feeds)["y"], expected, atol=1e-4, rtol=0)

    # ... and a build without one applies nothing.
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("EDGECC_TUNING_DIR", raising=False)
    result = build_artifact(matmul_relu, tmp_path / "untuned", target="host")
    assert result.manifest["schedules"]["tuning_db"]["applied"] is False


def test_zero_trials_only_confirms_the_best_records(tuned_db, matmul_relu, tmp_path):
    """`--trials 0`: no search, no new record; a best record that lost its verdict is re-timed against the
    default schedule and gets one again."""
    from edgecc.schedules.tuning import tune_model

    db, report, _events = tuned_db
    [task] = report.tasks
    again = tmp_path / "db"
    shutil.copytree(db, again)
    baselines = json.loads((again / "edgecc_baselines.json").read_text())
    for b in baselines.values():
        b.pop("confirmed", None)
    (again / "edgecc_baselines.json").write_text(json.dumps(baselines))
    before = _records(again)
    confirm = tune_model(matmul_relu, "host", trials=0, database_dir=again)
    assert confirm.trials_done == 0 and _records(again) == before
    [entry] = json.loads((again / "edgecc_baselines.json").read_text()).values()
    plausible = task.best_ms < entry["default_ms"] * CONFIRM_PLAUSIBLE
    assert ("confirmed" in entry) == plausible
    if plausible:
        assert confirm.tasks[0].confirmed == entry["confirmed"]["applies"]
        assert confirm.tasks[0].confirm_default_ms == entry["confirmed"]["default_ms"] > 0


def test_resume_through_the_cli_adds_trials_and_keeps_records(tuned_db, matmul_relu, cli, tmp_path):
    db, _report, _events = tuned_db
    resumed = tmp_path / "db"
    shutil.copytree(db, resumed)
    before = _records(resumed)
    baselines = (resumed / "edgecc_baselines.json").read_text()
    result = cli("tune", matmul_relu, "--trials", "4", "--db", resumed)
    assert result.exit_code == 0, result.output
    def defaults(text):  # the baseline itself; the confirmation verdict may change with a new best record
        return {k: (v["default_ms"], v["default_hash"]) for k, v in json.loads(text).items()}

    # default schedule unchanged: not re-timed
    assert defaults((resumed / "edgecc_baselines.json").read_text()) == defaults(baselines)
    after = _records(resumed)
    assert after[: len(before)] == before and len(after) == len(before) + 4
    assert "4 trial(s)" in result.output and f"now holds {len(after)} record(s) (4 new)" in result.output


@pytest.mark.slow
def test_time_budget_is_honoured(matmul_relu, tmp_path):
    from edgecc.schedules.tuning import tune_model

    budget = 15.0
    t0 = time.perf_counter()
    report = tune_model(matmul_relu, "host", trials=10_000, time_budget_s=budget, database_dir=tmp_path / "db")
    wall = time.perf_counter() - t0
    assert report.stopped_by == "time budget"
    assert report.trials_done < 10_000
    assert wall < budget + 20, f"tuning took {wall:.1f} s with a {budget} s budget"


# ------------------------------------------------------------------------------------------------ RPC


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tune_through_rpc_tracker_and_server(matmul_relu, tmp_path, monkeypatch):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    from edgecc.schedules.tuning import check_rpc, tune_model

    key = "edgecc-test-board"
    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    server = None
    try:
        monkeypatch.setenv("TVM_NUM_THREADS", "2")  # the server process measures with it
        server_port = _free_port()
        server = rpc.Server(host="127.0.0.1", port=server_port, port_end=server_port + 1,
                            tracker_addr=("127.0.0.1", tracker.port), key=key, silent=True)
        address = f"127.0.0.1:{tracker.port}"
        deadline = time.time() + 30
        while True:  # the server registers asynchronously
            try:
                if check_rpc(address, key) >= 1:
                    break
            except EdgeccError:
                if time.time() > deadline:
                    raise
            time.sleep(0.5)
        with pytest.raises(EdgeccError, match="no free server with key 'no-such-board'"):
            tune_model(matmul_relu, "host", trials=2, rpc=address, rpc_key="no-such-board")

        db = tmp_path / "db"
        report = tune_model(matmul_relu, "host", trials=4, database_dir=db, rpc=address, rpc_key=key)
        assert report.runner == f"rpc {address} key={key}"
        assert report.trials_done == 4 and len(_records(db)) == 4
        [task] = report.tasks
        assert task.errors < 4 and task.best_ms is not None
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()
