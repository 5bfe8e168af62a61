"""benchmarks/profile_vs_ort.py: both runtimes profiled while running the whole model, matched by output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import profile_vs_ort  # noqa: E402


def test_group_runs_takes_the_median_of_per_run_sums():
    runs = [
        [("conv_a", "conv/gemm", 100, 1.0), ("conv_b", "conv/gemm", 100, 2.0), ("pool", "pool", 50, 0.5)],
        [("conv_a", "conv/gemm", 100, 4.0), ("conv_b", "conv/gemm", 100, 4.0), ("pool", "pool", 50, 0.1)],
        [("conv_a", "conv/gemm", 100, 1.5), ("conv_b", "conv/gemm", 100, 1.5), ("pool", "pool", 50, 0.3)],
    ]
    groups = profile_vs_ort.group_runs(runs)
    assert set(groups) == {("conv/gemm", 100), ("pool", 50)}
    assert groups[("conv/gemm", 100)]["ms"] == 3.0  # per-run sums 3, 8, 3 -> median 3
    assert groups[("conv/gemm", 100)]["calls"] == 2
    assert abs(groups[("pool", 50)]["ms"] - 0.3) < 1e-12


def test_kinds_match_across_runtimes():
    assert profile_vs_ort.edgecc_kind("fused_conv2d_panels3_multiply5_add6_relu5") == "conv/gemm"
    assert profile_vs_ort.edgecc_kind("fused_matmul1_multiply3_add3") == "conv/gemm"
    assert profile_vs_ort.edgecc_kind("max_pool2d") == profile_vs_ort.ort_kind("MaxPool") == "pool"
    assert profile_vs_ort.ort_kind("FusedConv") == "conv/gemm"
    assert profile_vs_ort.edgecc_kind("fast_softmax") == profile_vs_ort.ort_kind("Softmax") == "other"


def _cnn(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.2).astype("float32"), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 16, 1, 1)) * 0.2).astype("float32"), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_profiles_a_small_cnn_on_both_runtimes(tmp_path):
    model = _cnn(tmp_path / "cnn.onnx")
    dump = tmp_path / "calls.json"
    done = subprocess.run([sys.executable, str(BENCH / "profile_vs_ort.py"), "--model", str(model), "--rounds", "2",
                           "--runs", "2", "--threads", "1", "--pause", "0", "--sequence", "--json", str(dump)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    calls = json.loads(dump.read_text())
    for runtime in ("edgecc", "onnxruntime"):
        runs = calls["runs"][runtime]
        assert len(runs) == 4, (runtime, len(runs))  # 2 rounds x 2 runs
        convs = [c for c in runs[0] if c[1] == "conv/gemm"]
        # the two convolutions, in execution order, by their output sizes: 16 x 16 x 16, then 32 x 8 x 8
        assert [c[2] for c in convs] == [16 * 16 * 16, 32 * 8 * 8], (runtime, runs[0])
        assert all(c[3] > 0 for c in runs[0])
    assert "conv/gemm" in done.stdout and "ratio of whole runs" in done.stdout
    whole = calls["whole_ms"]
    for runtime in ("edgecc", "onnxruntime"):  # every round timed profiled and unprofiled runs
        assert len(whole[runtime]["profiled"]) == 4 and len(whole[runtime]["plain"]) == 4, whole
    assert "--sequence: the conv/gemm calls do not pair up" not in done.stdout
