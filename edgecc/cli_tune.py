"""`edgecc tune`: MetaSchedule tuning from the command line (registered on `edgecc.cli.main`).

Progress (a rich progress bar) goes to stderr, the per-task table and the summary to stdout.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgecc.cli import err, out, user_errors


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class _TuneProgress:
    """Turns `TuneEvent`s into a rich progress bar: trials done / requested, best time of the current task."""

    def __init__(self, trials: int, time_budget: float | None):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=err,
            transient=False,
        )
        self.budget = time_budget
        self.task_id = self.progress.add_task("preparing", total=trials, info="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, event) -> None:
        info = ""
        if event.task is not None:
            info = f"{event.task} best {_ms(event.task_best_ms)} ms"
        if self.budget is not None:
            left = max(0.0, self.budget - event.elapsed_s)
            info = (info + "  " if info else "") + f"{left:.0f} s left"
        if event.phase in ("prepare", "baseline", "confirm"):
            self.progress.update(self.task_id, description=event.message, info=info)
        else:
            self.progress.update(self.task_id, description="tuning" if event.phase == "tune" else "done",
                                 completed=event.trials_done, info=info)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="host", show_default=True, help="Target name (see `edgecc targets`).")
@click.option("--trials", type=int, default=64, show_default=True,
              help="Candidates to measure in this run, all tasks together (0: no search, only re-time the "
                   "database's best records against the default schedules).")
@click.option("--time-budget", "time_budget", type=float, default=None, metavar="SECONDS",
              help="Stop before this much wall-clock time has passed (whatever --trials says).")
@click.option("--db", "db", type=click.Path(path_type=Path), default=None,
              help="Database directory (default: the target's own, under $EDGECC_CACHE or ~/.cache/edgecc).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim, as for `edgecc build` (tune the shapes you will build).")
@click.option("--rpc", default=None, metavar="HOST:PORT",
              help="Measure on a board through this TVM RPC tracker (needed for cross targets).")
@click.option("--key", "key", default=None, metavar="KEY", help="The board's key on the RPC tracker.")
@user_errors
def tune(model: Path, target: str, trials: int, time_budget: float | None, db: Path | None,
         dims: tuple[str, ...], rpc: str | None, key: str | None):
    """Tune MODEL's kernels for a target with MetaSchedule (XGBoost cost model, evolutionary search).

    Every distinct fused kernel becomes a task; candidates are compiled here and timed on the target (this
    machine, or a board behind --rpc). Records are appended to the database, so running again resumes, and
    `edgecc build` for the same target applies the best schedule of every kernel it finds there.
    """
    from edgecc.frontend.signature import parse_dim_bindings
    from edgecc.schedules.tuning import default_database_dir, tune_model
    from edgecc.targets.registry import get_target

    bindings = parse_dim_bindings(dims)
    spec = get_target(target)
    where = db if db is not None else default_database_dir(spec)
    how = f"on {rpc} ({key})" if rpc else "here"
    budget = f", at most {time_budget:g} s" if time_budget is not None else ""
    err.print(f"tuning [bold]{model.name}[/] for [bold]{target}[/] {how}: {trials} trials{budget} -> {where}")
    with _TuneProgress(trials, time_budget) as progress:
        report = tune_model(model, target=target, trials=trials, time_budget_s=time_budget, database_dir=db,
                            dims=bindings, rpc=rpc, rpc_key=key, progress=progress)
    table = Table(title=f"{model.name} on {target} ({report.runner})")
    for col in ("task", "calls", "trials", "errors", "default (ms)", "best before (ms)", "best now (ms)",
                "paired: default / tuned (ms)", "applied"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for t in report.tasks:
        paired = (f"{_ms(t.confirm_default_ms)} / {_ms(t.confirm_tuned_ms)}"
                  if t.confirm_default_ms is not None else "-")
        applied = {True: "tuned", False: "default"}.get(t.confirmed, "tuned" if t.name in report.beats_default
                                                        else "-")
        table.add_row(t.name, str(t.weight), str(t.trials), str(t.errors), _ms(t.default_ms),
                      _ms(t.best_ms_before), _ms(t.best_ms), paired, applied)
    out.print(table)
    for t in report.tasks:
        if t.skipped:
            out.print(f"[yellow]skipped[/] {t.name}: {t.skipped}")
    out.print(f"tuned {len(report.tasks)} task(s): {report.trials_done} trial(s) in {report.wall_s:.1f} s "
              f"(stopped by {report.stopped_by}); database {report.database_dir} "
              f"now holds {report.records_after} record(s) ({report.records_after - report.records_before} new)")
    out.print(f"{len(report.beats_default)} of {len(report.tasks)} kernel(s) beat edgecc's default schedule when "
              "re-timed side by side with it: "
              f"builds for {target} apply those records and keep the default schedules elsewhere")
