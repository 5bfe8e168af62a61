"""BYOC (bring your own codegen) for vendor targets: partition a model between a vendor library and the CPU.

A vendor target (a `TargetSpec` from a plugin, see `edgecc.targets.registry`) names its BYOC description in
`TargetSpec.byoc` as `"module:attribute"`; the attribute is a `ByocSpec` or a zero-argument callable that
returns one. It is imported only when a model is compiled for that target (listing targets stays cheap).

In the Relax pipeline (`edgecc.ir_passes.pipeline.relax_pipeline`) `byoc_passes(spec)` runs first, on the
imported graph, before legalization:

    FuseOpsByPattern(patterns, annotate_codegen=True)   every match becomes a function with
                                                        Composite=<pattern name> wrapped in one with
                                                        Codegen=<codegen>, global_symbol=<unique name>
    (merge=True: annotate_codegen=False, then           adjacent matches merged into one external function
     MergeCompositeFunctions)
    record the offloads                                 a module attribute read by `offload_summary`
    RunCodegen()                                        calls `relax.ext.<codegen>(functions, options,
                                                        constant_names)`; each partitioned call becomes a
                                                        `call_dps_packed` of its global symbol, and the
                                                        returned runtime modules are linked into the model

Whatever no pattern matched is legalized, fused and scheduled for the CPU as usual: the vendor library
gets the ops it accepts (its pattern `check` functions decide, e.g. by dtype and shape), the CPU the rest.

`merge=False` (the default) keeps one external function per matched pattern, i.e. one library call per
offloaded op: a codegen that emits calls into a kernel library needs nothing else. `merge=True` suits a
codegen that compiles whole subgraphs (a JSON graph for a vendor runtime, as TVM's own DNNL/TensorRT
backends do).

The `relax.ext.<codegen>` function must return runtime modules that `export_library` can link: TVM 0.27's
Python API can create C source modules (`runtime.CSourceModuleCreate`), which the exporter compiles with the
target's C++ compiler into `model.so` — see `examples/vendor_plugin` for a complete plugin.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from edgecc.errors import EdgeccError

# Module attribute of the partitioned IRModule: {"codegen": str, "offloaded": [pattern names, one per call]}.
OFFLOAD_ATTR = "edgecc_byoc_offloaded"


@dataclass(frozen=True)
class ByocSpec:
    """How a vendor target offloads ops to its own library or accelerator."""

    codegen: str  # name of the external codegen: partitions get Codegen=<codegen>, `relax.ext.<codegen>` compiles
    patterns: Callable[[], Sequence[Any]] | Sequence[Any]  # tvm.relax.transform.FusionPattern list, or a factory
    offloads: tuple[str, ...] = ()  # ONNX ops the library can take (shown by docs/reports; the patterns decide)
    register: Callable[[], None] | None = None  # registers `relax.ext.<codegen>` (called before RunCodegen)
    merge: bool = False  # MergeCompositeFunctions: adjacent partitions become one external function
    # (pattern names must then start with "<codegen>.", which is how TVM names the merged functions' codegen)
    options: dict[str, Any] | None = None  # passed to the codegen as RunCodegen's target options

    def fusion_patterns(self) -> list[Any]:
        patterns = self.patterns() if callable(self.patterns) else self.patterns
        return list(patterns)


@functools.lru_cache(maxsize=None)
def _resolve(ref: str) -> ByocSpec:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise EdgeccError(f"bad BYOC reference '{ref}'", "write TargetSpec.byoc as 'package.module:attribute'")
    try:
        obj: Any = getattr(importlib.import_module(module_name), attr)
        if callable(obj) and not isinstance(obj, ByocSpec):
            obj = obj()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is a user-facing error, not a traceback
        raise EdgeccError(f"BYOC description '{ref}' failed to load: {exc}",
                          "fix or reinstall the vendor package that provides the target") from exc
    if not isinstance(obj, ByocSpec):
        raise EdgeccError(f"BYOC description '{ref}' is a {type(obj).__name__}, not an edgecc ByocSpec",
                          "return edgecc.targets.byoc.ByocSpec from the plugin")
    return obj


def byoc_of(spec) -> ByocSpec | None:
    """The target's BYOC description, or None for targets that compile everything for the CPU."""
    ref = getattr(spec, "byoc", None)
    return _resolve(ref) if ref else None


def _offloaded_patterns(mod) -> list[str]:
    """Composite pattern names of the partitioned calls (one per external function), in module order."""
    from tvm import relax

    names: list[str] = []
    for _gv, func in sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint):
        if not isinstance(func, relax.Function) or func.attrs is None or "Codegen" not in func.attrs:
            continue

        def visit(expr, out=names):
            if isinstance(expr, relax.Function) and expr.attrs is not None and "Composite" in expr.attrs:
                out.append(str(expr.attrs["Composite"]))

        relax.analysis.post_order_visit(func.body, visit)
    return names


def byoc_passes(spec) -> list:
    """The partition + codegen stage for `spec` (empty for targets without BYOC)."""
    byoc = byoc_of(spec)
    if byoc is None:
        return []
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=f"edgecc.Byoc[{byoc.codegen}]")
    def _partition(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        patterns = byoc.fusion_patterns()
        if patterns:
            mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False,
                                                   annotate_codegen=not byoc.merge)(mod)
            if byoc.merge:  # groups adjacent composites; Codegen = the pattern names' prefix (before ".")
                mod = relax.transform.MergeCompositeFunctions()(mod)
        offloaded = _offloaded_patterns(mod)
        if offloaded:
            if byoc.register is not None:
                byoc.register()
            if tvm.get_global_func(f"relax.ext.{byoc.codegen}", allow_missing=True) is None:
                raise EdgeccError(f"no external codegen 'relax.ext.{byoc.codegen}' is registered",
                                  "the plugin's ByocSpec.register must register it (tvm.register_global_func)")
            options = {byoc.codegen: byoc.options} if byoc.options else None
            mod = relax.transform.RunCodegen(options)(mod)
        return mod.with_attr(OFFLOAD_ATTR, {"codegen": byoc.codegen, "offloaded": offloaded})

    return [_partition]


def offload_summary(mod) -> dict | None:
    """What `byoc_passes` offloaded in `mod` (also after the rest of the pipeline):
    `{"codegen": name, "offloaded": [pattern name per offloaded call]}`, or None when no BYOC stage ran."""
    attrs = getattr(mod, "attrs", None)
    if attrs is None or OFFLOAD_ATTR not in attrs:
        return None
    info = attrs[OFFLOAD_ATTR]
    return {"codegen": str(info["codegen"]), "offloaded": [str(n) for n in info["offloaded"]]}
