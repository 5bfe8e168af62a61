"""benchmarks/bench_latency.py --same-process: both runtimes in one process, single-threaded, outputs checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _mlp(path: Path) -> None:
    """y = relu(x @ W1 + b1) @ W2: small enough to build in seconds."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (64, 96)), ("b1", (96,)), ("w2", (96, 24)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 24])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _run(*args, cwd: Path):
    return subprocess.run([sys.executable, str(BENCH / "bench_latency.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_same_process_needs_single_threaded_runtimes(tmp_path):
    _mlp(tmp_path / "mlp.onnx")
    proc = _run("--model", str(tmp_path / "mlp.onnx"), "--same-process", "--threads", "2", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--threads 1 --ort-threads 1" in proc.stderr and "Traceback" not in proc.stderr


def test_same_process_times_both_and_checks_outputs(tmp_path):
    _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "result.json"
    proc = _run("--model", str(tmp_path / "mlp.onnx"), "--same-process", "--threads", "1", "--ort-threads", "1",
                "--iters", "5", "--warmup", "1", "--pause", "0", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["same_process"] is True
    assert set(result["stats"]) == {"edgecc", "onnxruntime"}
    assert all(len(v) == 5 and all(t > 0 for t in v) for v in result["raw_ms"].values())
    (diff,) = result["check"].values()
    assert diff < 1e-3  # edgecc's output against onnxruntime's, same process
    assert "in this one process" in proc.stdout
    assert result["threads"]["onnxruntime"] == "intra_op_num_threads=1"
    assert result["threads"]["edgecc"].startswith("TVM_NUM_THREADS=1")
