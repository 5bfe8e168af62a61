"""`edgecc tune` must tune the kernels the build has: its task list comes from the build's own stages.

Regression: the build fuses attention into one pre-scheduled kernel (`edgecc.ir_passes.fuse_attention`),
but the tuner's module skipped that pass, so it spent trials on q K^T, softmax and head-transpose kernels
no build contains (MiniLM: 3 of the 5 kernels that "beat" the default schedule did not exist in the build).
"""

from __future__ import annotations

import pytest
from tvm import tirx


def _fused_kernels(mod) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    from edgecc.models import registry

    return registry.get("tiny-gpt-prefill").export(tmp_path_factory.mktemp("tiny_gpt") / "tiny-gpt-prefill.onnx")


def test_tuning_tasks_are_the_build_kernels(tiny_gpt):
    from edgecc.build import lift_weight_transforms
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import read_signature
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.schedules.tuning import extract_tuning_tasks, fused_module
    from edgecc.targets.registry import get_target

    spec = get_target("host")
    fused = _fused_kernels(fused_module(tiny_gpt, spec))
    assert not [n for n in fused if "softmax" in n], sorted(fused)  # attention is one kernel, as in the build
    assert any("attention" in str((f.attrs or {}).get("edgecc.schedule", "")) for f in fused.values()), sorted(fused)

    model = load_model(tiny_gpt)
    deploy, _, _ = lift_weight_transforms(import_model(model, read_signature(model)))
    built = {_signature(f) for f in _fused_kernels(relax_pipeline(spec)(deploy)).values()}
    tasks = extract_tuning_tasks(fused_module(tiny_gpt, spec), spec)
    assert tasks
    missing = [t.task_name for t in tasks if _signature(t.dispatched[0]["main"]) not in built]
    assert not missing  # every task is (the unscheduled form of) a kernel of the build


def _signature(func) -> tuple:
    """Shapes and dtypes of a kernel's arguments, in order: what scheduling does not change."""
    from tvm.s_tir import meta_schedule as ms

    return tuple(str(a) for a in ms.arg_info.ArgInfo.from_prim_func(func))
