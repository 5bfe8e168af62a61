"""The weight-quantization pass: `R.matmul(x, W)` with W a weight parameter -> `edgecc.quantized_matmul`.

`quantize_weights(mod, params, recipe)` works on the deploy module of the build (after LiftTransformParams
ran the weight transforms, so every matmul weight is a [in, out] parameter of `main` after `num_input`):

* every `R.matmul(x, W)` whose right operand is a float 2-D weight parameter the recipe selects becomes
  `edgecc.quantized_matmul(x, W.qweight, W.scales[, W.zeros])` with the annotation dict as call attrs;
* the weight parameter is replaced by its packed tensors in place (same position in the parameter list),
  and dropped when nothing else uses it (a weight also used by a non-matmul keeps its float copy too);
* it returns the new module, the new (name, array) parameter list and a report for the manifest.

`method` picks the algorithm that chooses the codes (docs/compression.md): "rtn" (round to nearest, no data),
"gptq", "awq" or "smoothquant" (w8a8 layers; others get RTN), each with a `Calibration` (per-weight input
statistics, edgecc/compress/calibration.py). All store the same packed layout; AWQ and SmoothQuant also
divide the matmul's input by a per-channel scale s, kept as `x * (1/s)` (a `<name>.input_scale` parameter)
in front of the quantized matmul. A weight the calibration never saw falls back to RTN (reported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from edgecc.compress.recipe import Recipe, load_recipe
from edgecc.compress.rtn import QuantizedTensor, quantize_rtn
from edgecc.errors import EdgeccError
from edgecc.ir_passes.compression import quantized_matmul


@dataclass
class CompressionReport:
    recipe: str
    ops: list[dict] = field(default_factory=list)  # one entry per annotated op
    skipped: list[dict] = field(default_factory=list)  # matmul weights left in float, with the reason
    kept_float_copies: list[str] = field(default_factory=list)  # quantized weights also used elsewhere

    def to_manifest(self) -> dict:
        orig = sum(op["orig_bytes"] for op in self.ops)
        packed = sum(op["packed_bytes"] for op in self.ops)
        return {
            "scheme": self.recipe if self.ops else "none",
            "annotated_ops": self.ops,
            "skipped": self.skipped,
            "kept_float_copies": self.kept_float_copies,
            "orig_bytes": orig,
            "packed_bytes": packed,
        }


class QuantizeResult(NamedTuple):
    mod: tvm.IRModule
    params: list[tuple[str, np.ndarray]]
    report: CompressionReport


def _var_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _base(name: str) -> str:
    for suffix in (".weight", "_weight"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _static_shape(ty) -> tuple[int, ...] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, ValueError, AttributeError):
        return None


def weight_sources(transform_mod: tvm.IRModule | None, deploy_mod: tvm.IRModule,
                   original_names: list[str]) -> dict[str, str]:
    """Deploy-param name -> name of the ONNX initializer it was computed from (for lifted weights such as
    the transposed B of a Gemm, which LiftTransformParams names `lv3`). Identity when nothing was lifted."""
    main = deploy_mod["main"]
    num_input = int(main.attrs["num_input"])
    deploy_names = [p.name for p in main.params[num_input:]]
    if transform_mod is None:
        return dict(zip(deploy_names, original_names))
    func = transform_mod["main_transform_params"]
    source: dict = {}
    tuple_param = func.params[0]
    outputs = None
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(tuple_param):
                source[binding.var] = original_names[int(value.index)]
            elif isinstance(value, relax.Call):
                srcs = [source[a] for a in value.args if isinstance(a, relax.Var) and a in source]
                if len(srcs) == 1:
                    source[binding.var] = srcs[0]
            elif isinstance(value, relax.Var) and value in source:
                source[binding.var] = source[value]
            elif isinstance(value, relax.Tuple):
                outputs = value
    result_var = func.body.body
    if outputs is None or not isinstance(result_var, relax.Var):
        return dict(zip(deploy_names, deploy_names))
    names = {}
    for dname, field_expr in zip(deploy_names, outputs.fields):
        names[dname] = source.get(field_expr, dname) if isinstance(field_expr, relax.Var) else dname
    return names


METHODS = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")


def check_method(method: str | None, has_calib: bool) -> str:
    """The method name, or a one-line EdgeccError for an unknown method / missing calibration data."""
    m = (method or "rtn").strip().lower()
    if m not in METHODS:
        raise EdgeccError(f"unknown quantization method '{method}'", f"use one of {', '.join(METHODS)}")
    if m in CALIBRATED and not has_calib:
        raise EdgeccError(f"--method {m} needs calibration data",
                          "give --calib file.npz (one array per model input) or --calib-text file.txt")
    return m


def quantize_one(arr: np.ndarray, scheme, method: str, stats) -> tuple[QuantizedTensor, np.ndarray | None, str]:
    """(quantized weight, input scale s or None (the layer computes (x / s) @ W_q), method actually used)."""
    if method == "rtn" or stats is None:
        return quantize_rtn(arr, scheme), None, "rtn"
    if method == "gptq":
        from edgecc.compress.gptq import quantize_gptq

        return quantize_gptq(arr, stats.hessian, scheme), None, "gptq"
    if method == "awq":
        from edgecc.compress.awq import quantize_awq

        qt, s = quantize_awq(arr, stats.hessian, stats.absmean, scheme)
        return qt, (None if np.all(s == 1.0) else s), "awq"
    if method == "smoothquant":
        if not scheme.act_bits:
            return quantize_rtn(arr, scheme), None, "rtn"
        from edgecc.compress.smoothquant import smooth_weight

        ws, s = smooth_weight(arr, stats.absmax)
        return quantize_rtn(ws, scheme), s, "smoothquant"
    raise EdgeccError(f"unknown quantization method '{method}'", f"use one of {', '.join(METHODS)}")


def quantize_weights(mod: tvm.IRModule, params: list[tuple[str, np.ndarray]], recipe: str | Recipe,
                     sources: dict[str, str] | None = None, method: str = "rtn",
                     calibration=None) -> QuantizeResult:
    """Rewrite the eligible matmuls of `mod["main"]` (see module docstring). `params` are the weights in the
    order main takes them after `num_input`; `sources` maps param names to display/recipe names; `method` and
    `calibration` (an edgecc.compress.calibration.Calibration) choose the algorithm."""
    recipe = load_recipe(recipe)
    method = check_method(method, calibration is not None)
    report = CompressionReport(recipe.name)
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    wvars = list(main.params[num_input:])
    if len(wvars) != len(params):
        raise ValueError(f"{len(params)} params for {len(wvars)} weight parameters of main")
    sources = sources or {}
    index = {v: i for i, v in enumerate(wvars)}
    quantized: dict[int, tuple[QuantizedTensor, list[relax.Var], dict]] = {}
    undecided: dict[int, None] = {}

    def decide(i: int) -> tuple | None:
        if i in quantized:
            return quantized[i]
        if i in undecided:
            return None
        pname, arr = params[i]
        src = sources.get(pname, pname)
        shape = _static_shape(wvars[i].ty)
        if shape is None or len(shape) != 2 or arr.dtype != np.float32:
            undecided[i] = None
            report.skipped.append({"name": src, "shape": list(arr.shape), "reason": "not a static 2-D float32 weight"})
            return None
        scheme, why = recipe.choose(src, shape)
        if scheme is None:
            undecided[i] = None
            report.skipped.append({"name": src, "shape": list(shape), "reason": why})
            return None
        stats = calibration.lookup(src, np.asarray(arr)) if calibration is not None else None
        if stats is None and calibration is not None:
            stats = calibration.lookup(pname, np.asarray(arr))
        qt, in_scale, used = quantize_one(np.asarray(arr), scheme, method, stats)
        base = _base(src)
        new_vars = []
        for key, tensor in qt.tensors().items():
            pn = f"{base}.{'qweight' if key == 'weight' else key}"
            new_vars.append((pn, relax.Var(_var_name(pn), relax.TensorType(tensor.shape, str(tensor.dtype))), tensor))
        scale_var = None
        if in_scale is not None:  # x * (1/s) in front of the matmul (AWQ / SmoothQuant)
            inv = (1.0 / in_scale.astype(np.float64)).astype(np.float32)
            pn = f"{base}.input_scale"
            scale_var = (pn, relax.Var(_var_name(pn), relax.TensorType(inv.shape, "float32")), inv)
        k, n = shape
        ann = dict(scheme.to_attrs(), in_features=k, out_features=n, name=src, orig_dtype=str(arr.dtype),
                   orig_bytes=qt.original_nbytes, packed_bytes=qt.nbytes)
        entry = (qt, new_vars + ([scale_var] if scale_var else []), ann, scale_var)
        quantized[i] = entry
        extra = {"method": used}
        if method != "rtn" and used != method:
            extra["method_note"] = ("no calibration activations for this weight" if stats is None
                                    else f"{method} applies to a8 schemes only")
        report.ops.append(dict(ann, op="matmul", params=[pn for pn, _, _ in entry[1]], why=why, **extra))
        return entry

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM visitor name
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                    and call.op.name == "relax.matmul" and len(call.args) == 2):
                return call
            x, w = call.args
            if not isinstance(w, relax.Var) or w not in index:
                return call
            out_dtype = call.attrs.out_dtype
            if out_dtype is not None and str(out_dtype) not in ("", "void", "float32"):
                return call
            x_ty = x.ty
            if not isinstance(x_ty, relax.TensorType) or str(x_ty.dtype) != "float32" or x_ty.ndim < 2:
                return call
            entry = decide(index[w])
            if entry is None:
                return call
            _, new_vars, ann, scale_var = entry
            vs = [v for _, v, _ in new_vars if scale_var is None or v is not scale_var[1]]
            if scale_var is not None:
                x = self.builder_.emit(relax.op.multiply(x, scale_var[1]))
            return quantized_matmul(x, vs[0], vs[1], vs[2] if len(vs) > 2 else None, ann)

    body = _Rewriter().visit_expr(main.body)
    if not quantized:
        return QuantizeResult(mod, list(params), report)
    still_used = set(relax.analysis.free_vars(body))
    new_params = list(main.params[:num_input])
    new_named: list[tuple[str, np.ndarray]] = []
    for i, (v, (pname, arr)) in enumerate(zip(wvars, params)):
        if i in quantized:
            if v in still_used:
                new_params.append(v)
                new_named.append((pname, arr))
                report.kept_float_copies.append(sources.get(pname, pname))
            for pn, var, tensor in quantized[i][1]:
                new_params.append(var)
                new_named.append((pn, tensor))
        else:  # every other weight stays, in order
            new_params.append(v)
            new_named.append((pname, arr))
    new_main = relax.Function(new_params, body, main.ret_ty, main.is_pure, main.attrs, main.span)
    out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions_items()))
    out["main"] = new_main
    return QuantizeResult(out, new_named, report)


def compress_for_build(deploy_mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], quantize: str,
                       transform_mod: tvm.IRModule | None, original_names: list[str], method: str | None = None,
                       calibration=None):
    """The build's "compress" stage: (new deploy module, new named weights, manifest "compression").

    `calibration`: a Calibration, or (onnx_path, calib npz, calib text, tokenizer dir) to compute one from
    (see `calibration_for_build`)."""
    sources = weight_sources(transform_mod, deploy_mod, original_names)
    if isinstance(calibration, tuple):  # (onnx_path, calib, calib_text, tokenizer_dir)
        has_calib = calibration[1] is not None or calibration[2] is not None
    else:
        has_calib = calibration is not None
    method = check_method(method, has_calib)
    if isinstance(calibration, tuple):
        calibration = calibration_for_build(*calibration) if method != "rtn" else None
    result = quantize_weights(deploy_mod, named_weights, quantize, sources, method, calibration)
    manifest = result.report.to_manifest()
    if method != "rtn":
        manifest["method"] = method
        manifest["calibration"] = getattr(calibration, "source", "")
    return result.mod, result.params, manifest


_CALIB_CACHE: dict = {}


def calibration_for_build(onnx_path, calib=None, calib_text=None, tokenizer_dir=None):
    """Calibration of an ONNX model from `--calib file.npz` / `--calib-text file.txt` (cached per build
    inputs, so an LLM's decode and prefill graphs share one run)."""
    from pathlib import Path

    from edgecc.compress.calibration import calibrate_onnx

    key = tuple(str(Path(p).resolve()) if p else None for p in (onnx_path, calib, calib_text, tokenizer_dir))
    if key not in _CALIB_CACHE:
        _CALIB_CACHE.clear()
        cal = calibrate_onnx(onnx_path, calib=calib, calib_text=calib_text, tokenizer_dir=tokenizer_dir)
        cal.source = Path(calib or calib_text).name
        _CALIB_CACHE[key] = cal
    return _CALIB_CACHE[key]
