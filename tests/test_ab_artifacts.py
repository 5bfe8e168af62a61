"""benchmarks/ab_artifacts.py: two builds of one model in one process; outputs compared, paired ratios printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgecc.build import build_artifact

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ab_artifacts.py"


def _model(path: Path, op: str) -> Path:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 37])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 37])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(*args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_same_model_twice_and_a_different_one(tmp_path):
    relu = build_artifact(_model(tmp_path / "relu.onnx", "Relu"), tmp_path / "a", target="host").out_dir
    sigmoid = build_artifact(_model(tmp_path / "sigmoid.onnx", "Sigmoid"), tmp_path / "b", target="host").out_dir
    out = _run("--onnx", tmp_path / "relu.onnx", relu, relu, sigmoid, "--rounds", 3, "--threads", 1)
    diffs = [float(d) for d in re.findall(r"max \|diff\| vs \S+ (\S+)", out)]
    assert diffs[0] == 0.0 and diffs[1] == 0.0  # the first build against itself, then its second load
    assert diffs[2] > 0.1  # sigmoid(x) - relu(x) reaches 0.5 at x = 0: the comparison sees a different build
    paired = [float(p) for p in re.findall(r"paired (\d+\.\d+)$", out, re.M)]
    assert len(paired) == 3 and paired[0] == 1.0


def test_symbolic_dims_bound_as_built(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    built = build_artifact(path, tmp_path / "a", target="host", dims={"batch": 3}).out_dir
    out = _run("--onnx", path, "--dim", "batch=3", built, built, "--rounds", 2, "--threads", 1)
    assert [float(d) for d in re.findall(r"max \|diff\| vs \S+ (\S+)", out)] == [0.0, 0.0]


def test_missing_artifact_is_one_line(tmp_path):
    path = _model(tmp_path / "relu.onnx", "Relu")
    done = subprocess.run([sys.executable, str(SCRIPT), "--onnx", str(path), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "does not exist" in done.stderr and "Traceback" not in done.stderr
