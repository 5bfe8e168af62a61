"""The vendor plugin template (examples/vendor_plugin): a reference NPU target that offloads matmul and conv
through BYOC to its own C library, with the rest on the CPU.

The plugin is a separate package, installed as a real distribution so that edgecc finds it through the
`edgecc.targets` entry point: `scripts/install.sh` runs `pip install --no-deps -e examples/vendor_plugin`.
"""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from edgecc.errors import EdgeccError

TARGET = "ref-npu"


def _plugin_installed() -> bool:
    return any(e.name == TARGET for e in metadata.entry_points(group="edgecc.targets"))


pytestmark = pytest.mark.skipif(
    not _plugin_installed(),
    reason="the plugin template is not installed: pip install --no-deps -e examples/vendor_plugin "
           "(scripts/install.sh does it)")


def _save(graph, path, opset: int = 17):
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _conv_relu_matmul(path):
    """x [1,3,8,8] -> Conv(+bias) -> Relu -> flatten -> MatMul -> Add: conv and matmul for the NPU, the rest CPU."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "wc"),
             nh.from_array(rng.standard_normal(4).astype(np.float32), "bc"),
             nh.from_array(np.array([1, 256], dtype=np.int64), "shape"),
             nh.from_array((0.1 * rng.standard_normal((256, 10))).astype(np.float32), "wm"),
             nh.from_array(rng.standard_normal(10).astype(np.float32), "bm")]
    nodes = [oh.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Reshape", ["r", "shape"], ["f"]),
             oh.make_node("MatMul", ["f", "wm"], ["m"]),
             oh.make_node("Add", ["m", "bm"], ["y"])]
    graph = oh.make_graph(nodes, "conv_relu_matmul",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return _save(graph, path)


def _onnxruntime(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _offloaded_symbols(lowered) -> list[str]:
    """Names of the external (vendor) functions the lowered main calls."""
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(lowered["main"].body,
                                    lambda e: found.append(str(e.global_symbol))
                                    if isinstance(e, relax.ExternFunc) else None)
    return found


def test_plugin_target_is_listed(cli):
    result = cli("targets", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    npu = rows[TARGET]
    assert npu["plugin"] == "edgecc-ref-npu"
    assert npu["can_build"] and npu["can_run"]
    assert TARGET in cli("targets").output


def test_conv_relu_matmul_runs_conv_and_matmul_in_the_npu_library(tmp_path):
    import edgecc_ref_npu

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    onnx_path = _conv_relu_matmul(tmp_path / "m.onnx")
    out = tmp_path / "npu"
    build_artifact(onnx_path, out, target=TARGET)
    art = load_artifact(out)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    before = edgecc_ref_npu.call_counts(out / "model.so")
    got = art.run({"x": x})["y"]
    after = edgecc_ref_npu.call_counts(out / "model.so")
    ref = _onnxruntime(onnx_path, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # one run = one call of each kernel, all in the library inside model.so
    assert {k: after[k] - before[k] for k in after} == {"matmul_f32": 1, "conv2d_f32": 1,
                                                        "matmul_i8": 0, "conv2d_i8": 0}


def test_partition_leaves_the_rest_on_the_cpu(tmp_path):
    """The pipeline offloads exactly the conv and the matmul; bias, relu and reshape are TVM kernels."""
    from edgecc.build import _split_transform_params
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import read_signature
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.targets.byoc import offload_summary
    from edgecc.targets.registry import get_target

    model = load_model(_conv_relu_matmul(tmp_path / "m.onnx"))
    deploy, _ = _split_transform_params(import_model(model, read_signature(model)).mod)
    lowered = relax_pipeline(get_target(TARGET))(deploy)
    assert offload_summary(lowered) == {"codegen": "ref_npu",
                                        "offloaded": ["ref_npu.matmul_f32", "ref_npu.conv2d_f32"]}
    assert sorted(s for s in _offloaded_symbols(lowered) if s.endswith("_ref_npu")) == [
        "fused_relax_matmul_ref_npu", "fused_relax_nn_conv2d_ref_npu"]
    cpu_kernels = [gv.name_hint for gv, f in lowered.functions_items() if gv.name_hint != "main"]
    assert any("relu" in name for name in cpu_kernels), cpu_kernels
    assert not any("conv2d" in name or "matmul" in name for name in cpu_kernels), cpu_kernels
    # the same model for the host: nothing offloaded, no BYOC record
    assert offload_summary(relax_pipeline(get_target("host"))(deploy)) is None


def test_int8_matmul_and_conv_are_offloaded(tmp_path):
    """MatMulInteger / ConvInteger on int8 activations (no zero points): int8 kernels, int32 results, exact."""
    import edgecc_ref_npu

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    i8, i32 = TensorProto.INT8, TensorProto.INT32
    nodes = [oh.make_node("ConvInteger", ["x", "wc"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             oh.make_node("MatMulInteger", ["a", "wm"], ["m"])]
    graph = oh.make_graph(nodes, "int8", [oh.make_tensor_value_info("x", i8, [1, 3, 7, 7]),
                                          oh.make_tensor_value_info("wc", i8, [4, 3, 3, 3]),
                                          oh.make_tensor_value_info("a", i8, [2, 3, 16]),
                                          oh.make_tensor_value_info("wm", i8, [16, 5])],
                          [oh.make_tensor_value_info("c", i32, [1, 4, 4, 4]),
                           oh.make_tensor_value_info("m", i32, [2, 3, 5])])
    onnx_path = _save(graph, tmp_path / "i8.onnx")
    out = tmp_path / "npu8"
    build_artifact(onnx_path, out, target=TARGET)
    rng = np.random.default_rng(2)
    feeds = {"x": rng.integers(-128, 128, (1, 3, 7, 7)), "wc": rng.integers(-128, 128, (4, 3, 3, 3)),
             "a": rng.integers(-128, 128, (2, 3, 16)), "wm": rng.integers(-128, 128, (16, 5))}
    feeds = {k: v.astype(np.int8) for k, v in feeds.items()}
    got = load_artifact(out).run(feeds)
    ref = _onnxruntime(onnx_path, feeds)
    for name in ("c", "m"):
        np.testing.assert_array_equal(got[name], ref[name])
    counts = edgecc_ref_npu.call_counts(out / "model.so")
    assert counts["matmul_i8"] == 1 and counts["conv2d_i8"] == 1
    assert counts["matmul_f32"] == 0 and counts["conv2d_f32"] == 0


def test_validate_reports_offloaded_and_cpu_ops(cli, tmp_path):
    """`edgecc validate --target ref-npu`: per case and per op, where it ran, beside the numerics."""
    report_dir = tmp_path / "report"
    selection = "test_matmul_2d,test_matmul_bcast,test_conv_with_strides_padding,test_relu,not:expanded"
    result = cli("validate", "--target", TARGET, "-k", selection, "-j", "1", "-o", report_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    cases = {c["name"]: c for c in report["cases"]}
    assert set(cases) == {"test_matmul_2d", "test_matmul_bcast", "test_conv_with_strides_padding", "test_relu"}
    assert all(c["status"] == "pass" for c in cases.values())
    assert cases["test_matmul_2d"]["offloaded"] == ["ref_npu.matmul_f32"]
    assert cases["test_conv_with_strides_padding"]["offloaded"] == ["ref_npu.conv2d_f32"]
    assert cases["test_matmul_bcast"]["offloaded"] == []  # a broadcast the library cannot do: CPU fallback
    assert cases["test_relu"]["offloaded"] == []
    ops = report["ops"]
    assert ops["MatMul"]["offload"] == {"offloaded": 1, "cpu": 1, "not_built": 0, "patterns": ["ref_npu.matmul_f32"]}
    assert ops["Conv"]["offload"]["offloaded"] == 1 and ops["Relu"]["offload"]["cpu"] == 1
    assert report["offload"] == {"offloaded": 2, "cpu": 2, "not_built": 0}
    md = (report_dir / "report.md").read_text()
    assert "## Offload (BYOC)" in md and "| MatMul | 2 | 1 | 1 | 0 | 2 | ref_npu.matmul_f32 |" in md
    assert "Ops with no offloaded case (CPU fallback, or not built), 1: Relu." in md


def test_host_validate_records_no_offload():
    from edgecc.conformance.report import build_report

    results = [{"name": "t", "op": "Relu", "outcome": "pass", "stage": None, "reason": None, "frozen": [],
                "outputs": [], "offloaded": None, "seconds": 0.1}]
    report = build_report(results, {}, "host", {}, 1.0)
    assert "offload" not in report and "offload" not in report["ops"]["Relu"]


def test_bad_byoc_reference_is_a_user_error():
    from dataclasses import replace

    from edgecc.targets.byoc import byoc_passes
    from edgecc.targets.registry import get_target

    spec = get_target(TARGET)
    assert spec.byoc == "edgecc_ref_npu:BYOC"
    for ref, message in (("no_colon", "bad BYOC reference"), ("edgecc_ref_npu:nothing_here", "failed to load"),
                         ("edgecc_ref_npu:targets", "not an edgecc ByocSpec")):
        with pytest.raises(EdgeccError, match=message):
            byoc_passes(replace(spec, byoc=ref))


def test_merge_mode_partitions_through_merge_composite_functions(tmp_path, monkeypatch):
    """ByocSpec.merge=True: FuseOpsByPattern without codegen annotation + MergeCompositeFunctions."""
    from dataclasses import replace

    import edgecc_ref_npu
    import tvm

    from edgecc.build import _split_transform_params
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import read_signature
    from edgecc.targets.byoc import byoc_passes, offload_summary
    from edgecc.targets.registry import get_target

    monkeypatch.setattr(edgecc_ref_npu, "BYOC_MERGED", replace(edgecc_ref_npu.BYOC, merge=True), raising=False)
    spec = replace(get_target(TARGET), byoc="edgecc_ref_npu:BYOC_MERGED")
    model = load_model(_conv_relu_matmul(tmp_path / "m.onnx"))
    deploy, _ = _split_transform_params(import_model(model, read_signature(model)).mod)
    partitioned = tvm.transform.Sequential(byoc_passes(spec))(deploy)
    assert sorted(offload_summary(partitioned)["offloaded"]) == ["ref_npu.conv2d_f32", "ref_npu.matmul_f32"]
    assert len([s for s in _offloaded_symbols(partitioned) if s.endswith("_ref_npu")]) == 2
