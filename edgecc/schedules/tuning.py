"""`edgecc tune`: MetaSchedule auto-tuning of a model's fused kernels, and the database builds read back.

    model.onnx ─▶ import (as `edgecc build` does) ─▶ legalize + fuse ─▶ one task per distinct fused PrimFunc
      ─▶ evolutionary search guided by an XGBoost cost model ─▶ build in this process ─▶ measure
         (LocalRunner here, RPCRunner on a board behind a TVM tracker) ─▶ JSONDatabase on disk

The database lives in a directory per target (`default_database_dir`): MetaSchedule's two JSON files
(`database_workload.json`, `database_tuning_record.json`) plus `edgecc_tuning.json`, which names the target
it was measured on. A record is keyed by the *structural hash of the fused PrimFunc* (the workload), so it
applies to any model, on any machine, whose fused kernel is identical, and only there. `build` picks the
database up automatically (`relax_pipeline`): `apply_database_pass` replaces every fused PrimFunc that has a
record by its best measured schedule and marks it scheduled, and edgecc's default rules schedule the rest.
Each kernel's default schedule is timed like the candidates (`edgecc_baselines.json`). Right after the search,
each kernel's best record and its default schedule are timed again, alternately, in the same minute
("confirmation"): the search's record and the pre-search baseline were timed minutes apart, and on a shared
machine the load between them moves more than most tuning gains. A build applies a record only where that
paired measurement confirms it is faster, so a short tuning run never makes a build slower than an untuned one.

Tuning drives MetaSchedule's pieces (TuneContext, EvolutionarySearch, XGBModel, JSONDatabase, runners) from
a loop here instead of `tune_tasks`, for what that loop cannot give on a small shared machine:

- a builder that compiles in this process (the default LocalBuilder's fresh popen workers spend ~28 s each
  importing `tvm.s_tir.tensor_intrin`, and its 30 s timeout then kills most builds);
- a wall-clock budget, checked before every candidate, and a trial count that is exact;
- no spinning: a task whose search space is exhausted (no candidates, or empty batches) is retired, where
  the gradient task scheduler keeps re-picking it;
- progress reports after every measurement, for the CLI's progress bar.

Resuming is the default: records already in the database stay, warm up the cost model, seed the search's
initial population, and new trials are appended.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgecc.errors import EdgeccError
from edgecc.targets.registry import TargetSpec, get_target

if TYPE_CHECKING:  # pragma: no cover
    import tvm

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "edgecc_tuning.json"
BASELINE_FILE = "edgecc_baselines.json"  # per workload: time of edgecc's default schedule, measured alike
TUNED = "tuned"  # value of edgecc.schedule on functions scheduled from the database
TUNING_ATTR = "edgecc.tuning"  # "default-faster" on functions whose records lost to the default schedule

# Measurement: each candidate runs `number` times per repeat, repeats until `min_repeat_ms`; median of repeats.
EVAL_NUMBER = 3
EVAL_REPEAT = 3
EVAL_MIN_REPEAT_MS = 50
APPLY_MARGIN = 0.98  # a tuned record replaces the default schedule only when at least 2% faster than it
CONFIRM_ROUNDS = 5  # paired confirmation: default and record each timed this many times, alternating
CONFIRM_PLAUSIBLE = 1.25  # records slower than this x the baseline are not worth confirming
# one task's confirmation = two builds + CONFIRM_ROUNDS runs of each, costed in measured trials (a trial is a
# build and a run; measured: 2.8 s for one confirmation at 0.4 s per trial)
CONFIRM_TRIALS = CONFIRM_ROUNDS + 2
CONFIRM_RESERVE = 0.15  # share of --time-budget kept for the confirmation after the search
XGB_THREADS = int(os.environ.get("EDGECC_XGB_THREADS", "1"))  # xgboost on tiny training sets: 1 thread is faster


# ---------------------------------------------------------------------------------------------------
# Where the database lives
# ---------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """$EDGECC_CACHE, else ~/.cache/edgecc."""
    env = os.environ.get("EDGECC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgecc"


def target_json(spec: TargetSpec) -> dict[str, Any]:
    """The TVM target of `spec` as a JSON dict (what records are measured for)."""
    return json.loads(str(spec.tvm()))


def target_hash(spec: TargetSpec) -> str:
    canonical = json.dumps(target_json(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def default_database_dir(spec: TargetSpec) -> Path:
    """`$EDGECC_CACHE/tuning/<target name>-<hash of its TVM target JSON>` (one database per target).

    `$EDGECC_TUNING_DIR` replaces `$EDGECC_CACHE/tuning` alone (the test suite points it at a temporary
    directory, so a developer's own tuning records never change what the tests build).
    """
    env = os.environ.get("EDGECC_TUNING_DIR")
    root = Path(env).expanduser() if env else cache_root() / "tuning"
    return root / f"{spec.name}-{target_hash(spec)}"


def has_records(database_dir: str | Path | None) -> bool:
    """Whether a database directory holds at least one tuning record."""
    if database_dir is None:
        return False
    path = Path(database_dir) / RECORD_FILE
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def count_records(database_dir: str | Path) -> int:
    path = Path(database_dir) / RECORD_FILE
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def resolve_database_dir(spec: TargetSpec, tuning_db: str | Path | None = None) -> Path | None:
    """The database a build for `spec` should apply: `tuning_db` if given, else the target's default one.

    Returns None when there is nothing to apply (no records). An explicit directory that does not exist is
    a user error.
    """
    if tuning_db is not None:
        path = Path(tuning_db).expanduser()
        if not path.is_dir():
            raise EdgeccError(f"tuning database '{path}' does not exist",
                              "run `edgecc tune` with --db pointing there first, or fix the path")
        return path if has_records(path) else None
    path = default_database_dir(spec)
    return path if has_records(path) else None


def _read_meta(database_dir: Path) -> dict | None:
    try:
        return json.loads((database_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_database_target(spec: TargetSpec, database_dir: Path) -> None:
    """Refuse a database measured for another TVM target (its schedules would be tuned for other hardware)."""
    meta = _read_meta(database_dir)
    if not meta or "tvm_target" not in meta.get("target", {}):
        return  # a plain MetaSchedule database: the user vouches for it
    if meta["target"]["tvm_target"] != target_json(spec):
        raise EdgeccError(
            f"tuning database '{database_dir}' was measured for target '{meta['target'].get('name')}' "
            f"({json.dumps(meta['target']['tvm_target'], sort_keys=True)}), not '{spec.name}' "
            f"({json.dumps(target_json(spec), sort_keys=True)})",
            f"tune for '{spec.name}' into its own database (default: {default_database_dir(spec)})",
        )


def _write_meta(spec: TargetSpec, database_dir: Path) -> None:
    from edgecc import __version__

    path = database_dir / META_FILE
    if path.exists():
        return
    meta = {
        "format": 1,
        "target": {"name": spec.name, "tvm_target": target_json(spec), "arch": spec.arch},
        "created_by": f"edgecc {__version__}",
        "note": "MetaSchedule JSONDatabase; records are keyed by the structural hash of each fused PrimFunc",
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# Applying the database in a build
# ---------------------------------------------------------------------------------------------------


def _open_database(database_dir: Path, allow_missing: bool):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(
        path_workload=str(database_dir / WORKLOAD_FILE),
        path_tuning_record=str(database_dir / RECORD_FILE),
        allow_missing=allow_missing,
        module_equality="structural",
    )


def _workload_mod(func):
    """The IRModule a fused PrimFunc is recorded under: MetaSchedule's own normalisation (the function as
    "main", with global_symbol "main" and tirx.noalias), which is what task extraction stores."""
    import tvm_ffi

    return tvm_ffi.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")(func)


def apply_database_pass(spec: TargetSpec, database_dir: str | Path | None) -> "tvm.transform.Pass | None":
    """A module pass that gives every fused PrimFunc with a record in `database_dir` its best tuned schedule.

    Runs after FuseTIR and before the default schedules. A function it schedules gets the attributes
    `tirx.is_scheduled` = True (so the default rules skip it) and `edgecc.schedule` = "tuned"; the others are
    left as they were. Matching is by structural equality of the whole fused function, so a record never
    applies to a kernel that differs in shape, dtype or fused epilogue. None when there are no records.
    """
    if database_dir is None or not has_records(database_dir):
        return None
    database_dir = Path(database_dir)
    check_database_target(spec, database_dir)

    import tvm
    from tvm import tirx

    from edgecc.schedules.base import SCHEDULE_ATTR, is_scheduled

    @tvm.transform.module_pass(opt_level=0, name="EdgeccApplyTuningDatabase")
    def _apply(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        target = tvm.target.Target.current(allow_none=True) or spec.tvm()
        database = _open_database(database_dir, allow_missing=False)
        baselines = load_baselines(database_dir)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            workload = _workload_mod(func)
            try:
                record = database.query_tuning_record(workload, target, gv.name_hint)
                if record is None:
                    continue
                baseline = baselines.get(_workload_key(workload))
                tuned_ms = _run_ms(record.run_secs)
                if tuned_ms is None:  # only failed candidates: nothing to apply
                    continue
                if baseline is not None and not (baseline.get("confirmed") or {}).get("applies"):
                    updates[gv] = func.with_attr(TUNING_ATTR, "default-faster")  # no need to replay the trace
                    continue
                sch = database.query_schedule(workload, target, gv.name_hint)
            except Exception as exc:  # noqa: BLE001 - a record that no longer replays: use the default rules
                log.warning("tuning record for %s does not apply: %s", gv.name_hint,
                            str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__)
                continue
            if sch is None:
                continue
            if baseline is not None and not confirmed_faster(baseline, sch.mod):
                updates[gv] = func.with_attr(TUNING_ATTR, "default-faster")
                continue
            new_func = sch.mod["main"]
            if func.attrs is not None:
                new_func = new_func.with_attrs(func.attrs)
            if new_func.attrs is not None and "global_symbol" in new_func.attrs and (
                    func.attrs is None or "global_symbol" not in func.attrs):
                new_func = new_func.without_attr("global_symbol")
            updates[gv] = new_func.with_attr("tirx.is_scheduled", True).with_attr(SCHEDULE_ATTR, TUNED)
        if not updates:
            return mod
        mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _apply


def confirmed_faster(baseline: dict, tuned_mod) -> bool:
    """Did the paired confirmation find this exact tuned schedule faster than the default schedule it was
    timed against? A record that was never confirmed (or another record, or a default schedule that changed
    since) is not applied: re-running `edgecc tune` on the database confirms it."""
    import tvm_ffi

    conf = baseline.get("confirmed")
    if not conf or not conf.get("applies"):
        return False
    return (conf.get("tuned_hash") == str(tvm_ffi.structural_hash(tuned_mod))
            and conf.get("default_hash") == baseline.get("default_hash"))


def count_tuned_functions(mod) -> int:
    """How many PrimFuncs of `mod` were scheduled from a tuning database."""
    from edgecc.schedules.base import SCHEDULE_ATTR

    return _count_attr(mod, SCHEDULE_ATTR, TUNED)


def count_default_faster(mod) -> int:
    """How many PrimFuncs had records that did not beat the default schedule (kept the default)."""
    return _count_attr(mod, TUNING_ATTR, "default-faster")


def _count_attr(mod, key: str, value: str) -> int:
    from tvm import tirx

    n = 0
    for _gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and key in func.attrs:
            n += str(func.attrs[key]) == value
    return n


def _workload_key(workload_mod) -> str:
    """The structural hash MetaSchedule keys the workload by (deterministic across processes)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(workload_mod))


def load_baselines(database_dir: Path) -> dict[str, dict]:
    try:
        return json.loads((Path(database_dir) / BASELINE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_baselines(database_dir: Path, baselines: dict[str, dict]) -> None:
    path = Path(database_dir) / BASELINE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(baselines, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def database_summary(database_dir: Path | None, tuned_functions: int, default_faster: int = 0) -> dict:
    """The manifest's `schedules.tuning_db`: which database a build applied (by directory name and content
    hash, never an absolute path), how many kernels it scheduled, and how many kept the default schedule
    because their best record was not faster."""
    if database_dir is None:
        return {"applied": False, "database": None, "records_sha256": None, "tuned_functions": 0,
                "default_faster": 0}
    digest = hashlib.sha256((Path(database_dir) / RECORD_FILE).read_bytes()).hexdigest()
    return {"applied": True, "database": Path(database_dir).name, "records_sha256": digest,
            "tuned_functions": tuned_functions, "default_faster": default_faster}


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


@dataclass
class TaskReport:
    name: str
    weight: int  # how many times the model calls this kernel
    trials: int = 0  # measured in this run (failures included)
    errors: int = 0  # of those, how many failed to build or run
    default_ms: float | None = None  # edgecc's default schedule, measured the same way
    best_ms_before: float | None = None  # best record in the database before this run
    best_ms: float | None = None  # best record after this run
    done: bool = False  # search space exhausted or per-task cap reached
    skipped: str | None = None  # why the task was not tuned at all
    confirmed: bool | None = None  # paired re-timing: best record faster than default (None: not compared)
    confirm_default_ms: float | None = None  # medians of that paired re-timing
    confirm_tuned_ms: float | None = None


@dataclass
class TuneReport:
    target: str
    database_dir: Path
    tasks: list[TaskReport]
    trials_done: int
    trials_requested: int
    wall_s: float
    stopped_by: str  # "trials", "time budget", "search exhausted"
    records_before: int
    records_after: int
    runner: str  # "local (N threads)" or "rpc host:port key=K"

    @property
    def best_latency_ms(self) -> dict[str, float | None]:
        return {t.name: t.best_ms for t in self.tasks}

    @property
    def beats_default(self) -> list[str]:
        """Tasks whose best record the paired confirmation found faster than the default schedule (what a
        build will use); with no baseline at all, the best record is used as it is."""
        return [t.name for t in self.tasks if t.best_ms is not None and
                (t.confirmed or (t.default_ms is None and t.confirmed is None))]

    def to_json(self) -> dict:
        out = asdict(self)
        out["database_dir"] = str(self.database_dir)
        return out


@dataclass
class TuneEvent:
    """What the progress callable gets: after each measured candidate, and at each phase change."""

    phase: str  # "prepare", "tune", "done"
    message: str
    trials_done: int = 0
    trials_total: int = 0
    elapsed_s: float = 0.0
    time_budget_s: float | None = None
    task: str | None = None
    task_best_ms: float | None = None
    tasks_total: int = 0


ProgressFn = Callable[[TuneEvent], None]


# ---------------------------------------------------------------------------------------------------
# MetaSchedule plumbing
# ---------------------------------------------------------------------------------------------------


def _host_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _ms_logger() -> logging.Logger:
    """MetaSchedule's per-task chatter goes here (WARNING unless the user turns it up)."""
    logger = logging.getLogger("edgecc.tuning.metaschedule")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return logger


def _has_int8(func) -> bool:
    """Whether a kernel reads or writes 8-bit integers (where the target's dot-product intrinsics matter)."""
    try:
        return any(str(getattr(p, "dtype", "")) in ("int8", "uint8") for p in func.params)
    except Exception:  # noqa: BLE001
        return False


def _space_generator(needs_intrinsics: bool):
    """Post-order-apply with the generic LLVM rules, or the target's own (tensor intrinsics) for int8 kernels.

    The target-specific CPU rule sets (x86 VNNI/AVX-512, Arm dotprod, RISC-V RVV) reference tensor intrinsics
    that exist only after `import tvm.s_tir.tensor_intrin` (24-120 s here); they add nothing to float kernels.
    """
    from tvm.s_tir import meta_schedule as ms

    if needs_intrinsics:
        import tvm.s_tir.tensor_intrin  # noqa: F401 - registers the intrinsics the target rules name

        return ms.space_generator.PostOrderApply()
    return ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")


def _tune_context(mod, target, task_name: str, space, strategy, num_threads: int, seed: int):
    """`ms.TuneContext(...)` without its constructor's unconditional `import tvm.s_tir.tensor_intrin`."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logging_func

    ctx = ms.TuneContext.__new__(ms.TuneContext)
    ctx.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space, strategy, task_name, num_threads, seed,
        get_logging_func(_ms_logger()),
    )
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


def _make_builder(spec: TargetSpec, export_dir: Path, shared_library: bool):
    """A MetaSchedule Builder that compiles in this process (same steps as `ms.builder.default_build`).

    `shared_library`: link a .so with the target's compiler (for RPC: the board needs no toolchain);
    otherwise a tar of object files that the local runner links.
    """
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def __init__(self):
            super().__init__()
            self.count = 0

        def build(self, build_inputs):
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
            from tvm.support.tar import tar

            results = []
            for build_input in build_inputs:
                self.count += 1
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(build_input.mod)
                    rt_mod = tvm.tirx.build(mod, target=build_input.target)
                    if shared_library:
                        path = export_dir / f"cand{self.count}.so"
                        if spec.cross_compiler:
                            rt_mod.export_library(str(path),
                                                  fcompile=tvm.support.cc.cross_compiler(spec.cross_compiler))
                        else:
                            rt_mod.export_library(str(path))
                    else:
                        path = export_dir / f"cand{self.count}.{tar.output_format}"
                        rt_mod.export_library(str(path), fcompile=tar)
                    results.append(ms.builder.BuilderResult(str(path), None))
                except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is a failed trial
                    msg = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
                    results.append(ms.builder.BuilderResult(None, f"InProcessBuilder: {type(exc).__name__}: {msg}"))
            return results

    return InProcessBuilder()


def _evaluator_config():
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=EVAL_NUMBER, repeat=EVAL_REPEAT, min_repeat_ms=EVAL_MIN_REPEAT_MS,
                                     enable_cpu_cache_flush=False)


def _set_worker_threads(n: int) -> None:  # runs in the runner's worker process
    os.environ["TVM_NUM_THREADS"] = str(n)
    try:
        import tvm_ffi

        tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
    except Exception:  # noqa: BLE001
        pass


def _make_local_runner(num_threads: int, timeout_s: float):
    """LocalRunner whose worker process runs kernels on `num_threads` threads (TVM alone would use 1 here)."""
    import functools

    from tvm.s_tir import meta_schedule as ms

    old = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(num_threads)  # the popen worker is spawned now and inherits it
    try:
        return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=_evaluator_config(),
                                     initializer=functools.partial(_set_worker_threads, num_threads))
    finally:
        if old is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = old


def parse_rpc(rpc: str) -> tuple[str, int]:
    host, sep, port = rpc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeccError(f"bad --rpc '{rpc}'", "write it as HOST:PORT of the RPC tracker, e.g. 127.0.0.1:9190")
    return host, int(port)


def _rpc_config(rpc: str, key: str, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    host, port = parse_rpc(rpc)
    return ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                               session_priority=1, session_timeout_sec=int(timeout_s))


def check_rpc(rpc: str, key: str, timeout_s: float = 10.0) -> int:
    """Fail early, with the fix, when the tracker is unreachable or has no server under `key`."""
    config = _rpc_config(rpc, key, timeout_s)
    host, port = parse_rpc(rpc)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise EdgeccError(f"cannot reach the RPC tracker at {rpc}: {exc}",
                          "start one (python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190) or fix --rpc")
    try:
        return config.count_num_servers(allow_missing=False)
    except ValueError as exc:
        raise EdgeccError(f"the RPC tracker at {rpc} has no free server with key '{key}'",
                          f"start one on the board (python -m tvm.exec.rpc_server --tracker {rpc} --key {key}) "
                          "or fix --key; `python -m tvm.exec.query_rpc_tracker` lists them") from exc


def _make_rpc_runner(rpc: str, key: str, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.RPCRunner(rpc_config=_rpc_config(rpc, key, timeout_s), evaluator_config=_evaluator_config(),
                               max_workers=1)


def _shutdown_runner(runner) -> None:
    pool = getattr(runner, "pool", None)
    if pool is not None:
        try:
            pool.shutdown(wait=False)
        except Exception:  # noqa: BLE001
            pass


def _run_ms(run_secs) -> float | None:
    if run_secs is None:
        return None
    values = sorted(float(s) for s in run_secs)
    if not values or values[0] >= 1e9 or values[0] <= 0:
        return None
    return values[len(values) // 2] * 1e3


# ---------------------------------------------------------------------------------------------------
# The model -> tasks
# ---------------------------------------------------------------------------------------------------


def fused_module(onnx_path: str | Path, spec: TargetSpec, dims: dict[str, int] | None = None):
    """The model as `build_artifact` sees it right before scheduling: imported, weights lifted and rewritten
    (`build.rewrite_weights`), legalized+fused.

    The stages before FuseTIR must be `relax_pipeline`'s exactly (vendor partitioning, attention fusion on
    CPU targets): a kernel the build never has (attention's q K^T, softmax, head transposes) is a task whose
    trials are wasted, and a record is keyed by the fused kernel's structure, so it only applies to a match.
    """
    import tvm

    from edgecc.build import lift_weight_transforms, rewrite_weights
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import bind_dims, read_signature
    from edgecc.ir_passes.fuse_attention import applies_to, fuse_attention_pass
    from edgecc.ir_passes.pipeline import legalize_and_fuse_passes
    from edgecc.targets.byoc import byoc_passes

    model = load_model(onnx_path)
    signature = bind_dims(read_signature(model), dims or {})
    imported = import_model(model, signature)
    del model
    deploy_mod, _transform, named_weights = lift_weight_transforms(imported)
    deploy_mod, _ = rewrite_weights(deploy_mod, named_weights, spec)  # the GEMVs a build has (weight panels)
    fused = [fuse_attention_pass(spec)] if applies_to(spec) else []
    stages = byoc_passes(spec) + fused + legalize_and_fuse_passes()
    with spec.tvm():
        return tvm.transform.Sequential(stages)(deploy_mod)


def extract_tuning_tasks(fused_mod, spec: TargetSpec) -> list:
    """MetaSchedule tasks (one per structurally distinct fused PrimFunc), without already-scheduled ones."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_mod, spec.tvm(), module_equality="structural")
    out = []
    for task in tasks:
        attrs = task.dispatched[0]["main"].attrs
        if attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"]):
            continue
        out.append(task)
    return out


# ---------------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    report: TaskReport
    ctx: Any
    workload: Any
    alive: bool = True
    empty_batches: int = 0
    best_ms: float = math.inf
    gen_s: float | None = None  # how long generating its last batch of candidates took


def tune_model(
    onnx_path: str | Path,
    target: str = "host",
    trials: int = 64,
    time_budget_s: float | None = None,
    database_dir: str | Path | None = None,
    dims: dict[str, int] | None = None,
    rpc: str | None = None,
    rpc_key: str | None = None,
    progress: ProgressFn | None = None,
    *,
    batch_size: int = 16,
    max_trials_per_task: int | None = None,
    population_size: int = 256,
    seed: int | None = None,
    measure_timeout_s: float = 60.0,
) -> TuneReport:
    """Tune the fused kernels of `onnx_path` for `target` with MetaSchedule; records go to the database.

    Stops after `trials` new measurements, when `time_budget_s` (wall clock, from the call) would be
    exceeded by the next candidate, or when every task's search space is exhausted — whichever comes first.
    `rpc` ("host:port" of a TVM RPC tracker) + `rpc_key` measure on the board registered under that key;
    without them kernels are measured here, which only a target of this machine's architecture allows.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_budget_s if time_budget_s is not None else math.inf
    say = progress or (lambda _event: None)
    if trials < 0:
        raise EdgeccError(f"--trials must not be negative (got {trials})",
                          "pass a number of trials (0: only re-time the database's best records)")
    if time_budget_s is not None and time_budget_s <= 0:
        raise EdgeccError(f"--time-budget must be positive (got {time_budget_s})", "pass seconds, e.g. 300")

    spec = get_target(target)
    rpc_key = rpc_key or (spec.rpc_key if rpc is not None else None)  # a plugin target may name its boards' key
    if spec.device != "cpu":
        raise EdgeccError(f"tuning for '{spec.name}' ({spec.device}) is not supported yet",
                          "tune a CPU target; GPU targets use the default dlight schedules")
    if rpc is None and rpc_key is not None:
        raise EdgeccError("--key given without --rpc", "pass the tracker as --rpc HOST:PORT too")
    if rpc is not None:
        if not rpc_key:
            raise EdgeccError("--rpc needs --key",
                              "pass the key the board's RPC server registered with, e.g. --key rpi4")
        parse_rpc(rpc)
    elif spec.is_cross:
        raise EdgeccError(
            f"tuning for '{spec.name}' ({spec.arch}) needs the real board: kernels are timed where they run, "
            f"and this machine is {os.uname().machine} (qemu timings would be meaningless)",
            "run `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY` on the board and pass "
            "--rpc HOST:PORT --key KEY",
        )

    def elapsed() -> float:
        return time.perf_counter() - t0

    def event(phase: str, message: str, **kw) -> None:
        say(TuneEvent(phase=phase, message=message, trials_total=trials, elapsed_s=elapsed(),
                      time_budget_s=time_budget_s, **kw))

    if rpc is not None:
        event("prepare", f"checking the RPC tracker at {rpc}")
        check_rpc(rpc, rpc_key)

    event("prepare", "importing the model")
    fused = fused_module(onnx_path, spec, dims)
    event("prepare", "extracting tasks")
    tasks = extract_tuning_tasks(fused, spec)
    del fused
    if not tasks:
        raise EdgeccError(f"'{Path(onnx_path).name}' has no kernels to tune", "nothing to do: build it directly")

    from tvm.s_tir import meta_schedule as ms

    tvm_target = spec.tvm()
    database_dir = Path(database_dir).expanduser() if database_dir is not None else default_database_dir(spec)
    database_dir.mkdir(parents=True, exist_ok=True)
    check_database_target(spec, database_dir)
    _write_meta(spec, database_dir)
    records_before = count_records(database_dir)
    database = _open_database(database_dir, allow_missing=True)

    host_threads = _host_threads()
    needs_intrinsics = any(_has_int8(t.dispatched[0]["main"]) for t in tasks)
    per_task = max_trials_per_task or max(trials, 1)
    batch = max(1, min(batch_size, trials))
    cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=XGB_THREADS, tree_method="auto")
    rand = seed if seed is not None else -1

    event("prepare", f"initialising {len(tasks)} task(s)")
    states: list[_Task] = []
    for i, task in enumerate(tasks):
        mod = task.dispatched[0]
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population_size)
        ctx = _tune_context(mod, tvm_target, task.task_name, _space_generator(needs_intrinsics), strategy,
                            host_threads, rand if rand < 0 else rand + i)
        report = TaskReport(name=task.task_name, weight=int(task.weight))
        state = _Task(report=report, ctx=ctx, workload=None)
        if database.has_workload(mod):
            state.workload = database.commit_workload(mod)
            previous = database.get_top_k(state.workload, 64)
            if previous:
                best = _run_ms(previous[0].run_secs)
                report.best_ms_before = report.best_ms = best
                state.best_ms = best if best is not None else math.inf
                if trials:
                    _warm_up(cost_model, ctx, previous)
        if trials:  # --trials 0 only confirms: no search space to generate
            ctx.pre_tuning(max_trials=per_task, num_trials_per_iter=batch,
                           design_spaces=ctx.generate_design_space(), database=database, cost_model=cost_model)
        states.append(state)

    export_dir = Path(tempfile.mkdtemp(prefix="edgecc-tune-"))
    builder = _make_builder(spec, export_dir, shared_library=rpc is not None)
    event("prepare", "starting the measurement worker" if rpc is None else f"connecting to {rpc} ({rpc_key})")
    if rpc is None:
        runner = _make_local_runner(spec.num_cores, measure_timeout_s)
        runner_desc = f"local ({spec.num_cores} threads)"
    else:
        runner = _make_rpc_runner(rpc, rpc_key, measure_timeout_s)
        runner_desc = f"rpc {rpc} key={rpc_key}"

    device_type = "cpu" if tvm_target.kind.name in ("llvm", "c") else tvm_target.kind.name
    trials_done = 0
    stopped_by = "search exhausted"
    per_trial_s: float | None = None  # running estimate: build + measure of one candidate
    gen_times: list[float] = []  # how long generating the last batches took
    update_s = 0.0  # how long the last cost-model update after a batch took

    def search_left() -> float:
        """Seconds the search may still use: the budget less the confirmation's share, or what confirming
        the biggest task is estimated to cost if that is more (on a loaded machine it is)."""
        if time_budget_s is None:
            return math.inf
        reserve = max(CONFIRM_RESERVE * time_budget_s, CONFIRM_TRIALS * (per_trial_s or 0.0))
        return deadline - reserve - time.perf_counter()

    try:
        per_trial_s = _measure_baselines(spec, states, database_dir, builder, runner, device_type, deadline, event)
        while True:
            if trials_done >= trials:
                stopped_by = "trials"
                break
            alive = [s for s in states if s.alive]
            if not alive:
                stopped_by = "search exhausted"
                break
            state = _pick_task(alive)
            # generating a batch costs seconds (more for big kernels): start one only if it and one
            # measurement fit in what is left of the budget
            gen_estimate = state.gen_s if state.gen_s is not None else max(gen_times[-4:], default=0.0)
            if search_left() <= gen_estimate + (per_trial_s or 0.0) + update_s:
                stopped_by = "time budget"
                break
            t_gen = time.perf_counter()
            try:
                candidates = state.ctx.generate_measure_candidates()
            except Exception as exc:  # noqa: BLE001 - a search that crashes retires its task, not the run
                log.warning("search for %s failed: %s", state.report.name, exc)
                candidates = None
            state.gen_s = time.perf_counter() - t_gen
            gen_times.append(state.gen_s)
            if candidates is None:
                _retire(state)
                continue
            if len(candidates) == 0:
                state.empty_batches += 1
                if state.empty_batches >= 2:
                    _retire(state)
                continue
            candidates = list(candidates)[: trials - trials_done]
            measured, builds, results = [], [], []
            for cand in candidates:
                if search_left() < (per_trial_s or 0.0) + update_s:
                    break
                t_trial = time.perf_counter()
                build, result = _measure(builder, runner, cand.sch.mod, cand.args_info, tvm_target, device_type)
                _commit(database, state, [cand], [result], tvm_target)  # on disk now: Ctrl-C loses nothing
                measured.append(cand)
                builds.append(build)
                results.append(result)
                trials_done += 1
                state.report.trials += 1
                ms_value = _run_ms(result.run_secs) if result.error_msg is None else None
                if ms_value is None:
                    state.report.errors += 1
                elif ms_value < state.best_ms:
                    state.best_ms = ms_value
                    state.report.best_ms = ms_value
                dt = time.perf_counter() - t_trial
                per_trial_s = dt if per_trial_s is None else 0.7 * per_trial_s + 0.3 * dt
                event("tune", f"{state.report.name}: trial {state.report.trials}",
                      trials_done=trials_done, task=state.report.name, task_best_ms=state.report.best_ms,
                      tasks_total=len(states))
            if measured:
                t_update = time.perf_counter()
                state.ctx.notify_runner_results(measured, results)
                _update_cost_model(cost_model, state.ctx, measured, builds, results)
                update_s = time.perf_counter() - t_update
            if state.report.trials >= per_task:
                _retire(state)
            if len(measured) < len(candidates) and trials_done < trials:
                stopped_by = "time budget"
                break
        _confirm_best_records(spec, states, database, database_dir, builder, runner, device_type, deadline,
                              CONFIRM_TRIALS * (per_trial_s or 0.0), event)
    finally:
        _shutdown_runner(runner)
        for state in states:
            try:
                state.ctx.post_tuning()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(export_dir, ignore_errors=True)

    for state in states:
        state.report.done = not state.alive
    report = TuneReport(
        target=spec.name, database_dir=database_dir, tasks=[s.report for s in states], trials_done=trials_done,
        trials_requested=trials, wall_s=round(elapsed(), 2), stopped_by=stopped_by,
        records_before=records_before, records_after=count_records(database_dir), runner=runner_desc,
    )
    event("done", f"{trials_done} trial(s), stopped by {stopped_by}", trials_done=trials_done,
          tasks_total=len(states))
    return report


def _measure(builder, runner, mod, args_info, target, device_type):
    """Build one module here and time it with the runner: (BuilderResult, RunnerResult)."""
    from tvm.s_tir import meta_schedule as ms

    build = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if build.error_msg is not None:
        return build, ms.runner.RunnerResult(None, build.error_msg)
    result = runner.run([ms.runner.RunnerInput(build.artifact_path, device_type, args_info)])[0].result()
    try:
        os.unlink(build.artifact_path)
    except OSError:
        pass
    return build, result


def _default_scheduled(spec: TargetSpec, workload):
    """The workload's function as `build` schedules it without a database (edgecc's default rules)."""
    import tvm

    from edgecc.ir_passes.pipeline import schedule_passes

    with spec.tvm():
        return tvm.transform.Sequential(schedule_passes(spec))(workload)


def _measure_baselines(spec, states, database_dir, builder, runner, device_type, deadline, event) -> float | None:
    """Time every task's default schedule the way candidates are timed, and keep it in the database dir.

    The apply pass uses a record only when it beats this, so a short tuning run can never make a build
    slower than an untuned one. Skipped for a task whose default schedule is unchanged since it was last
    measured. Returns the time one measurement took (a first per-trial estimate), if any ran.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm()
    baselines = load_baselines(database_dir)
    per_trial_s = None
    changed = False
    for state in states:
        workload = state.ctx.mod
        key = _workload_key(workload)
        try:
            scheduled = _default_scheduled(spec, workload)
        except Exception as exc:  # noqa: BLE001 - no baseline: records then apply unconditionally
            log.warning("default schedule of %s failed: %s", state.report.name, exc)
            continue
        default_key = str(tvm_ffi.structural_hash(scheduled))
        known = baselines.get(key)
        if known is not None and known.get("default_hash") == default_key:
            state.report.default_ms = known["default_ms"]
            continue
        if time.perf_counter() + (per_trial_s or 0.0) > deadline:
            break
        t = time.perf_counter()
        args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        build, result = _measure(builder, runner, scheduled, args_info, target, device_type)
        per_trial_s = time.perf_counter() - t
        default_ms = _run_ms(result.run_secs) if result.error_msg is None else None
        if default_ms is None:
            if build.error_msg is None:  # compiles but does not run on random inputs (e.g. gather indices)
                state.alive = False
                first = (result.error_msg or "no time").strip().splitlines()
                state.report.skipped = "cannot be timed on random inputs: " + (first[-1][:200] if first else "")
            continue
        state.report.default_ms = default_ms
        baselines[key] = {"task": state.report.name, "default_ms": default_ms, "default_hash": default_key}
        changed = True
        event("baseline", f"{state.report.name}: default schedule {default_ms:.4f} ms",
              task=state.report.name, task_best_ms=default_ms, tasks_total=len(states))
    if changed:
        _save_baselines(database_dir, baselines)
    return per_trial_s


def _confirm_best_records(spec, states, database, database_dir, builder, runner, device_type, deadline,
                          estimate_s, event) -> None:
    """Re-time each task's best record against its default schedule, alternately, and keep the verdict.

    The baseline was timed before the search and the record during it, minutes apart; on a shared machine
    those two times are not comparable (measured: prefill records that "beat" their baseline by 10-60% lost
    by 10-130% when re-timed back to back). Here both are built once and run `CONFIRM_ROUNDS` times each, in
    alternating order, and the medians decide. The verdict (with the hashes of both schedules) goes into
    `edgecc_baselines.json`; `apply_database_pass` applies a record only when its verdict says faster.
    Tasks are confirmed biggest first; those left when the time budget runs out stay unconfirmed (not
    applied) and are confirmed by the next `edgecc tune` on the database, which resumes.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm()
    baselines = load_baselines(database_dir)
    todo = []
    for state in states:
        key = _workload_key(state.ctx.mod)
        base = baselines.get(key)
        if base is None or state.workload is None:
            continue
        top = database.get_top_k(state.workload, 1)
        best = _run_ms(top[0].run_secs) if top else None
        if best is None or best >= base["default_ms"] * CONFIRM_PLAUSIBLE:
            state.report.confirmed = False if best is not None else None
            continue
        todo.append((state, key, base))
    todo.sort(key=lambda t: -t[0].report.weight * t[2]["default_ms"])
    changed = False
    for i, (state, key, base) in enumerate(todo):
        workload = state.ctx.mod
        try:
            sch = database.query_schedule(workload, target, state.report.name)
            default_mod = _default_scheduled(spec, workload)
        except Exception as exc:  # noqa: BLE001 - cannot replay: never applied anyway
            log.warning("cannot confirm %s: %s", state.report.name, exc)
            continue
        tuned_hash = str(tvm_ffi.structural_hash(sch.mod))
        default_hash = str(tvm_ffi.structural_hash(default_mod))
        known = base.get("confirmed") or {}
        if known.get("tuned_hash") == tuned_hash and known.get("default_hash") == default_hash == base.get(
                "default_hash"):
            _report_confirmation(state, known)  # confirmed by an earlier run, nothing changed since
            continue
        # started only if it is expected to end within the budget: estimated from the trials' cost, then
        # from the last confirmation's
        if time.perf_counter() + estimate_s > deadline:
            event("confirm", f"time budget spent: {len(todo) - i} kernel(s) not confirmed (not applied); "
                  "run `edgecc tune` again on this database to confirm them")
            break
        event("confirm", f"{state.report.name}: re-timing the best record against the default schedule",
              task=state.report.name, tasks_total=len(states))
        args_info = ms.arg_info.ArgInfo.from_prim_func(workload["main"])
        t_confirm = time.perf_counter()
        times = _paired_times(builder, runner, [default_mod, sch.mod], args_info, target, device_type)
        estimate_s = time.perf_counter() - t_confirm
        if times is None:  # the reason is in the log (a build or run error): not confirmed, never applied
            event("confirm", f"{state.report.name}: re-timing failed, not confirmed (see the log)",
                  task=state.report.name, tasks_total=len(states))
            continue
        d_ms, t_ms = times
        verdict = {"tuned_hash": tuned_hash, "default_hash": default_hash, "default_ms": d_ms, "tuned_ms": t_ms,
                   "rounds": CONFIRM_ROUNDS, "applies": t_ms < d_ms * APPLY_MARGIN}
        if default_hash != base.get("default_hash"):  # default schedule changed since the baseline
            base.update(default_hash=default_hash, default_ms=d_ms)
        base["confirmed"] = verdict
        changed = True
        _report_confirmation(state, verdict)
        event("confirm", f"{state.report.name}: default {d_ms:.4f} ms, tuned {t_ms:.4f} ms -> "
              + ("tuned" if verdict["applies"] else "default kept"), task=state.report.name,
              task_best_ms=state.report.best_ms, tasks_total=len(states))
    if changed:
        _save_baselines(database_dir, baselines)


def _report_confirmation(state: _Task, verdict: dict) -> None:
    state.report.confirmed = bool(verdict["applies"])
    state.report.confirm_default_ms = verdict["default_ms"]
    state.report.confirm_tuned_ms = verdict["tuned_ms"]


def _paired_times(builder, runner, mods, args_info, target, device_type) -> list[float] | None:
    """Build each module once, then time them in turn `CONFIRM_ROUNDS` times (order alternating per
    round): the median time of each, in ms, or None if any fails."""
    from tvm.s_tir import meta_schedule as ms

    paths = []
    try:
        for mod in mods:
            build = builder.build([ms.builder.BuilderInput(mod, target)])[0]
            if build.error_msg is not None:
                log.warning("paired re-time: build failed: %s", str(build.error_msg)[:500])
                return None
            paths.append(build.artifact_path)
        samples: list[list[float]] = [[] for _ in mods]
        for r in range(CONFIRM_ROUNDS):
            order = range(len(mods)) if r % 2 == 0 else reversed(range(len(mods)))
            for j in order:
                result = runner.run([ms.runner.RunnerInput(paths[j], device_type, args_info)])[0].result()
                value = _run_ms(result.run_secs) if result.error_msg is None else None
                if value is None:
                    log.warning("paired re-time: run failed: %s (run_secs %s)", str(result.error_msg)[:500],
                                result.run_secs)
                    return None
                samples[j].append(value)
        return [sorted(v)[len(v) // 2] for v in samples]
    finally:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass


def _pick_task(alive: list[_Task]) -> _Task:
    """The task whose share of the model's latency (calls x best known time, default schedule included) is
    largest, discounted by how often it was tuned already, so one big kernel cannot take every trial."""

    def score(s: _Task) -> float:
        known = [t for t in (s.best_ms, s.report.default_ms) if t is not None and t != math.inf]
        best = min(known) if known else 1e3  # unknown: measure it soon
        return s.report.weight * best / math.sqrt(1 + s.report.trials)

    return max(alive, key=score)


def _retire(state: _Task) -> None:
    state.alive = False


def _commit(database, state: _Task, candidates, results, target) -> None:
    """What MetaSchedule's AddToDatabase callback does: one record per measured candidate (failures at 1e10 s)."""
    from tvm.s_tir import meta_schedule as ms

    if state.workload is None:
        state.workload = database.commit_workload(state.ctx.mod)
    for cand, result in zip(candidates, results):
        run_secs = result.run_secs if result.run_secs is not None else [1e10]
        database.commit_tuning_record(ms.database.TuningRecord(
            trace=cand.sch.trace, workload=state.workload, run_secs=[float(s) for s in run_secs],
            target=target, args_info=cand.args_info))


def _update_cost_model(cost_model, ctx, candidates, builds, results) -> None:
    """What MetaSchedule's UpdateCostModel callback does: learn from built candidates (runtime errors included)."""
    keep_c, keep_r = [], []
    for cand, build, result in zip(candidates, builds, results):
        if build.error_msg is None and (result.error_msg is not None or
                                        (result.run_secs is not None and sum(float(s) for s in result.run_secs) > 0)):
            keep_c.append(cand)
            keep_r.append(result)
    if keep_c:
        try:
            cost_model.update(ctx, keep_c, keep_r)
        except Exception as exc:  # noqa: BLE001 - a cost-model hiccup must not lose the measurements
            log.warning("cost model update failed: %s", exc)


def _warm_up(cost_model, ctx, records) -> None:
    """Resume: train the cost model on the records already in the database for this task."""
    from tvm.s_tir import meta_schedule as ms

    candidates, results = [], []
    for record in records:
        try:
            candidates.append(record.as_measure_candidate())
            results.append(ms.runner.RunnerResult([float(s) for s in record.run_secs], None))
        except Exception:  # noqa: BLE001 - a record that no longer replays is skipped
            continue
    if candidates:
        try:
            cost_model.update(ctx, candidates, results)
        except Exception as exc:  # noqa: BLE001
            log.warning("warming up the cost model failed: %s", exc)
