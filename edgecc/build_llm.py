"""`edgecc build` for decoders: prefill + decode ONNX graphs -> one stateful module with a preallocated KV cache.

    decode.onnx  ─▶ import ─▶ lift weights ─▶ [compress] ─▶ find KV pairs ─▶ concat growth → in-place append ─┐
    prefill.onnx ─▶ import ─▶ lift weights ─▶ [compress] ─▶ presents → in-place writes into the same caches ─┤
                                                          one module: `prefill`, `decode`, shared weights ◀─┘
                  ─▶ lower (memory planned with past_len <= max_context) ─▶ codegen ─▶ params ─▶ manifest

The two entry points take the same weights (deduplicated by content, so a weight both graphs use is stored
once) and the same cache buffers, which the caller allocates once for `max_context` positions
(`edgecc.runtime_bridge.llm_session`). Without a prefill graph, prompts go through `decode` token by token.
See docs/llm.md.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecc.build import (BuildResult, Progress, _export_library, _versions, check_build_request,
                          compile_executable, lift_weight_transforms, stage_timer, target_manifest)
from edgecc.errors import EdgeccError
from edgecc.runtime_bridge import artifact as art
from edgecc.runtime_bridge.params_file import write_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")


@dataclass
class _Graph:
    role: str
    path: Path
    onnx_sig: object
    mod: object  # IRModule with "main"
    named_weights: list
    compression: dict


def resolve_llm_inputs(model_path: str | Path, prefill: str | Path | None) -> tuple[Path, Path | None]:
    """A directory with decode.onnx (+ prefill.onnx) or a decode ONNX file (+ --prefill)."""
    path = Path(model_path)
    if path.is_dir():
        decode = path / "decode.onnx"
        if not decode.exists():
            raise EdgeccError(f"directory '{path}' has no decode.onnx",
                              "give the decoder's ONNX file, or a directory holding decode.onnx and prefill.onnx")
        if prefill is None and (path / "prefill.onnx").exists():
            prefill = path / "prefill.onnx"
        return decode, Path(prefill) if prefill else None
    sibling = path.with_name("prefill.onnx")
    if prefill is None and path.name == "decode.onnx" and sibling.exists():
        prefill = sibling
    return path, Path(prefill) if prefill else None


def _import_graph(role: str, path: Path, quantize: str | None, method: str | None = None,
                  calibration=None) -> _Graph:
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import read_signature

    model = load_model(path)
    sig = read_signature(model)
    imported = import_model(model, sig)
    del model
    deploy_mod, transform_mod, named_weights = lift_weight_transforms(imported)
    from edgecc.compress.quantize import imported_compression

    compression = imported_compression(deploy_mod)  # ops the model brought quantized (docs/compression.md)
    if quantize:
        from edgecc.compress.quantize import compress_for_build

        deploy_mod, named_weights, compression = compress_for_build(
            deploy_mod, named_weights, quantize, transform_mod, [n for n, _ in imported.params],
            method=method, calibration=calibration, graph_path=path)
    from edgecc.ir_passes.merge_linears import merge_for_build

    deploy_mod, named_weights = merge_for_build(deploy_mod, named_weights)  # q/k/v, gate/up: one matmul each
    return _Graph(role, path, sig, deploy_mod, named_weights, compression)


def _weight_key(arr: np.ndarray) -> tuple:
    return (str(arr.dtype), arr.shape, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())


def _share_weights(graphs: list[tuple[str, object, list]]):
    """Give every function the same weight parameter list (deduplicated by content).

    graphs: [(entry name, Relax function, [(name, array)])] -> ({entry: function}, [(name, array)]).
    """
    from tvm import relax

    unified: list[tuple[str, np.ndarray]] = []
    types: list = []
    index: dict[tuple, int] = {}
    per_func = []
    for entry, func, named in graphs:
        num_input = int(func.attrs["num_input"])
        slots = []
        for var, (name, arr) in zip(func.params[num_input:], named):
            key = _weight_key(arr)
            if key not in index:
                index[key] = len(unified)
                unique = name if name not in {n for n, _ in unified} else f"{entry}.{name}"
                unified.append((unique, arr))
                types.append(var.ty)
            slots.append((var, index[key]))
        per_func.append((entry, func, num_input, slots))
    out = {}
    for entry, func, num_input, slots in per_func:
        # Each function gets its own Var objects (a Var has one definition site per module), same order.
        own = [relax.Var(name.replace(".", "_"), ty) for (name, _), ty in zip(unified, types)]
        bound = func.bind_params({var: own[k] for var, k in slots})  # weight params -> shared slots
        params = list(func.params[:num_input]) + own
        new = relax.Function(params, bound.body, None, func.is_pure, func.attrs, func.span)
        out[entry] = new.with_attr("global_symbol", entry)
    return out, unified


def build_llm_artifact(
    model_path: str | Path,
    out_dir: str | Path,
    target: str = "host",
    prefill: str | Path | None = None,
    max_context: int = 2048,
    kv_cache: list[str] | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    schedules: bool = True,
    progress: Progress | None = None,
    tuning_db: str | Path | None = None,
    quantize: str | None = None,
    kv_dtype: str | None = None,
    method: str | None = None,
    calib: str | Path | None = None,
    calib_text: str | Path | None = None,
) -> BuildResult:
    """Compile a decoder (decode graph, optional prefill graph) into a KV-cache module (module docstring).

    `method`/`calib`/`calib_text`: as build_artifact's; calibration runs the prefill graph (the decode graph
    when there is none) and both graphs find their weights' activations by content."""
    import tvm
    from tvm import relax

    from edgecc.ir_passes import kv_cache as kv

    say = progress or (lambda _msg: None)
    timings: dict[str, float] = {}
    spec, out_dir = check_build_request(target, out_dir, force)
    if spec.device != "cpu":
        raise EdgeccError(f"KV-cache decoder builds support CPU targets only, not '{spec.name}'",
                          "build the decoder for a CPU target (host, x86-*, arm-*, riscv64-rvv)")
    if not isinstance(max_context, int) or max_context < 2:
        raise EdgeccError(f"--max-context must be an integer >= 2, got {max_context!r}", "e.g. --max-context 1024")
    decode_path, prefill_path = resolve_llm_inputs(model_path, prefill)

    stage = stage_timer(say, timings)

    with stage("import decode"):
        calibration = (prefill_path or decode_path, calib, calib_text,
                       tokenizer or (decode_path.parent if calib_text else None))
        decode = _import_graph("decode", decode_path, quantize, method, calibration)
    dfunc = decode.mod["main"]
    d_inputs = [t.name for t in decode.onnx_sig.inputs]
    d_outputs = [t.name for t in decode.onnx_sig.outputs]
    pairs = kv.find_kv_pairs(dfunc, d_inputs, kv_cache)
    if not pairs:
        raise EdgeccError("no KV-cache inputs found in the decode graph (inputs: "
                          f"{kv.describe_inputs(dfunc, d_inputs)})",
                          "a decoder takes past keys/values [1, heads, past_len, head_dim] and returns "
                          "Concat(past, new); name them with --kv-cache if the pattern differs")
    seq_dims = {int(d) for t in decode.onnx_sig.inputs if t.name not in {p.input_name for p in pairs}
                for d in t.shape[1:2] if isinstance(d, int)}
    decode_seq = 1 if seq_dims <= {1} else min(seq_dims)
    layout = kv.cache_layout(pairs, max_context, kv_dtype)
    with stage("kv rewrite"):
        dmod, d_kept = kv.rewrite_decode(decode.mod, "main", pairs, layout, decode_seq)
    entries = {"decode": {"inputs": [decode.onnx_sig.inputs[i].to_json() for i in range(len(d_inputs))
                                     if i not in {p.input_index for p in pairs}],
                          "outputs": [decode.onnx_sig.outputs[j].to_json() for j in d_kept],
                          "seq": decode_seq}}
    functions = [("decode", dmod)]
    compression = {"decode": decode.compression}

    if prefill_path is not None:
        with stage("import prefill"):
            pre = _import_graph("prefill", prefill_path, quantize, method, calibration)
        pfunc = pre.mod["main"]
        p_outputs = [t.name for t in pre.onnx_sig.outputs]
        seqs = [d for t in pre.onnx_sig.inputs for d in t.shape[1:2] if t.name == pre.onnx_sig.inputs[0].name]
        if not seqs or not isinstance(seqs[0], int):
            raise EdgeccError("the prefill graph's first input needs a static sequence length [1, P]",
                              "export prefill with a fixed (padded) prompt length")
        prefill_seq = int(seqs[0])
        if prefill_seq > max_context:
            raise EdgeccError(f"the prefill graph takes {prefill_seq} tokens, more than --max-context {max_context}",
                              f"use --max-context >= {prefill_seq}")
        presents = kv.match_prefill_presents(pfunc, p_outputs, d_outputs, pairs, prefill_seq)
        with stage("kv rewrite prefill"):
            pmod, p_kept = kv.rewrite_prefill(pre.mod, "main", presents, layout, prefill_seq)
        entries["prefill"] = {"inputs": [t.to_json() for t in pre.onnx_sig.inputs],
                              "outputs": [pre.onnx_sig.outputs[j].to_json() for j in p_kept],
                              "seq": prefill_seq}
        functions.insert(0, ("prefill", pmod))
        compression["prefill"] = pre.compression

    with stage("share weights"):
        named_by_entry = {"decode": decode.named_weights}
        if prefill_path is not None:
            named_by_entry["prefill"] = pre.named_weights
        shared, named_weights = _share_weights(
            [(entry, mod["main"], named_by_entry[entry]) for entry, mod in functions])
        module = tvm.IRModule({})
        for entry, _ in functions:
            module[entry] = shared[entry]
        # PrimFuncs (KV kernels) keep their original GlobalVars: rebuild each entry's calls against them.
        for entry, mod in functions:
            for gv, f in mod.functions_items():
                if gv.name_hint != "main":
                    module[gv] = f

    with stage("lower"):
        from edgecc.ir_passes.memory_plan import module_memory
        from edgecc.ir_passes.pipeline import relax_pipeline

        tvm_target = spec.tvm()
        lowered = relax_pipeline(spec, with_schedules=schedules, tuning_db=tuning_db)(module)
        memory = module_memory(lowered)
        from edgecc.schedules.base import schedule_report

        report = schedule_report(lowered)

    with stage("codegen"):
        executable = compile_executable(lowered, spec, tvm_target)

    tok_dir = Path(tokenizer) if tokenizer else decode_path.parent
    tok_files = [f for f in TOKENIZER_FILES if (tok_dir / f).exists()]
    if tokenizer and len(tok_files) != len(TOKENIZER_FILES):
        raise EdgeccError(f"'{tok_dir}' lacks {', '.join(sorted(set(TOKENIZER_FILES) - set(tok_files)))}",
                          "pass the directory an LLM export wrote its tokenizer to")
    if len(tok_files) != len(TOKENIZER_FILES):
        tok_files = []  # a partial tokenizer is not shipped: generate then asks for --prompt-ids

    with art.atomic_directory(out_dir, force=force) as tmp:
        with stage("link"):
            _export_library(executable, tmp / art.LIBRARY, spec)
        with stage("params"):
            write_params(tmp / art.PARAMS, named_weights)
        for f in tok_files:
            shutil.copyfile(tok_dir / f, tmp / f)
        weights_bytes = int(sum(w.nbytes for _, w in named_weights))
        arena = {name: m.arena_bytes for name, m in memory.items()}
        kv_bytes = layout.nbytes()
        manifest = {
            "format": art.FORMAT,
            "model": {"file": decode_path.name, "sha256": art.sha256_file(decode_path),
                      **({"prefill_file": prefill_path.name, "prefill_sha256": art.sha256_file(prefill_path)}
                         if prefill_path else {})},
            "signature": {"onnx": decode.onnx_sig.to_json(), "built": decode.onnx_sig.to_json(), "dims": {},
                          "index_bounds": {}},
            "entry": "decode",
            "llm": {
                "entries": entries,
                "kv_cache": layout.to_json(),
                "max_context": max_context,
                "kv_pairs": [{"input": p.input_name, "output": d_outputs[p.output_index]} for p in pairs],
                "tokenizer": bool(tok_files),
            },
            "target": target_manifest(spec, tvm_target),
            "params": [{"name": n, "dtype": str(w.dtype), "shape": list(w.shape)} for n, w in named_weights],
            "compression": _merge_compression(compression),
            "schedules": {"enabled": schedules,
                          "unscheduled": sorted(n for n, rule in report.items() if rule.startswith("none"))},
            "memory": {
                "weights_bytes": weights_bytes,
                "arena_bytes": arena,
                "dynamic_blocks": {name: m.dynamic_blocks for name, m in memory.items()},
                "kv_cache_bytes": kv_bytes,
                "kv_bytes_per_token": layout.bytes_per_token(),
                "total_bytes": weights_bytes + kv_bytes + max(arena.values(), default=0),
            },
            "versions": _versions(),
            "files": {name: {"sha256": art.sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in (art.LIBRARY, art.PARAMS, *tok_files)},
        }
        art.write_manifest(tmp, manifest)
    return BuildResult(out_dir, manifest, timings)


def _merge_compression(per_entry: dict[str, dict]) -> dict:
    """One summary: the decode graph's (prefill quantizes the same weights the same way)."""
    decode = per_entry["decode"]
    out = dict(decode)
    if "prefill" in per_entry:
        out["prefill_annotated_ops"] = len(per_entry["prefill"].get("annotated_ops", []))
    return out
