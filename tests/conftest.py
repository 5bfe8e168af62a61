"""Shared fixtures: small ONNX models generated here (torch -> ONNX), and a CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "1")  # tests run in parallel workers; keep each to one thread
# Builds pick up the target's tuning database automatically; tests must not depend on what a developer
# tuned on this machine, so they get an empty one (tuning tests set their own).
os.environ["EDGECC_TUNING_DIR"] = tempfile.mkdtemp(prefix="edgecc-test-tuning-")
atexit.register(shutil.rmtree, os.environ["EDGECC_TUNING_DIR"], True)


def export_two_heads(path: Path, seed: int = 0) -> Path:
    """A 2-input, 2-output model (Gemm+Relu, Conv+ReduceMean) with random weights drawn from `seed`."""
    import torch

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 32)
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x, y):
            return torch.relu(self.fc(x)), self.conv(y).mean()

    torch.manual_seed(seed)
    torch.onnx.export(TwoHeads().eval(), (torch.randn(2, 64), torch.randn(1, 3, 16, 16)), str(path),
                      input_names=["x", "y"], output_names=["a", "b"], dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory) -> Path:
    return export_two_heads(tmp_path_factory.mktemp("models") / "two_heads.onnx")


@pytest.fixture(scope="session")
def tiny_mlp_artifact(tiny_mlp, tmp_path_factory) -> Path:
    from edgecc.build import build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "two_heads"
    build_artifact(tiny_mlp, out, target="host")
    return out


@pytest.fixture()
def cli():
    """Invoke the edgecc CLI in-process; returns click's Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from edgecc.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def feeds_for_two_heads(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, 64)).astype(np.float32),
            "y": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}


def double_build_digests(tmp_path, monkeypatch, **build_options) -> list[dict[str, str]]:
    """Build tiny-transformer twice, in different directories a second apart; sha256 of every file, per build.

    The reproducibility tests compare the two: same model and options must give the same bytes.
    """
    import hashlib
    import shutil
    import time

    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS

    src = MODELS["tiny-transformer"].export(tmp_path / "src" / "t.onnx")
    digests = []
    for run in ("first", "second"):
        workdir = tmp_path / run / "nested"
        workdir.mkdir(parents=True)
        model = workdir / "t.onnx"
        shutil.copy(src, model)
        monkeypatch.chdir(workdir)
        out = workdir / "out"
        build_artifact(model, out, **build_options)
        digests.append({p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.rglob("*")) if p.is_file()})
        time.sleep(1.1)
    return digests


def export_mlp_onnx(path, k: int, hidden: int, n: int, batch: int):
    """x[batch, k] -> MatMul(k x hidden) + Add -> Relu -> Gemm(transB, n x hidden) -> y[batch, n], seeded weights.

    Returns (path, {"w1", "b1", "w2t" (the Gemm weight as [hidden, n]), "b2"}) for float64 references.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    b1 = (0.05 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((n, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (0.05 * rng.standard_normal(n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
             helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("Gemm", ["h2", "fc2.weight", "fc2.bias"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(a, name) for name, a in
         (("fc1.weight", w1), ("fc1.bias", b1), ("fc2.weight", w2), ("fc2.bias", b2))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path, {"w1": w1, "b1": b1, "w2t": w2.T.copy(), "b2": b2}


def relax_op_names(func) -> list[str]:
    """Names of the ops called in a Relax function, in post order (for IR before -> after checks)."""
    from tvm import relax

    names = []

    def visit(e):
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            names.append(e.op.name)

    relax.analysis.post_order_visit(func, visit)
    return names


def pack_low_bits_first(q: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] small ints -> uint8 [..., n*bits/8], lowest bits first (onnxruntime's MatMulNBits layout)."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per):
        out |= (q[..., i] << (i * bits)).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def neon_runs():
    """Skip where arm-neon code cannot run here (no cross compiler or no qemu; scripts/install.sh sets them up)."""
    from edgecc.targets.registry import get_target

    status = get_target("arm-neon").sdk_status()
    if not status.can_run:
        pytest.skip(f"arm-neon cannot run here: {status.how_it_runs} (scripts/install.sh sets it up)")
