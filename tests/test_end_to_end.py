"""Build -> run -> verify on the host, for the models the foundation issue names.

References are independent of edgecc: onnxruntime on the same ONNX file (and, for the memory plan, sizes
computed from the tensor shapes by hand).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import double_build_digests, export_two_heads, feeds_for_two_heads
from edgecc.build import build_artifact
from edgecc.models.registry import MODELS
from edgecc.runtime_bridge.host import load_artifact
from edgecc.runtime_bridge.verify import onnxruntime_reference, verify


def _build_and_verify(name: str, tmp_path, target: str = "host", feeds=None):
    entry = MODELS[name]
    onnx_path = entry.export(tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}.{target}"
    build_artifact(onnx_path, out, target=target)
    reports, used = verify(out, onnx_path, feeds if feeds is not None else entry.feeds(seed=1))
    return reports, out, onnx_path, used


def _assert_all_pass(reports):
    for r in reports:
        assert r.passed, f"{r.name}: max abs {r.max_abs_err:.3g}, cosine {r.cosine:.8f}"


@pytest.mark.parametrize("name", ["tiny-mlp", "tiny-cnn", "tiny-transformer"])
def test_synthetic_models_match_onnxruntime(name, tmp_path):
    reports, *_ = _build_and_verify(name, tmp_path)
    assert reports
    _assert_all_pass(reports)


def test_two_output_model_run_matches_onnxruntime(tiny_mlp, tiny_mlp_artifact):
    feeds = feeds_for_two_heads(3)
    got = load_artifact(tiny_mlp_artifact).run(feeds)
    ref = onnxruntime_reference(tiny_mlp, feeds)
    assert list(got) == ["a", "b"]
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)


def test_manifest_states_signature_target_memory_and_hashes(tiny_mlp, tiny_mlp_artifact):
    import hashlib

    manifest = json.loads((tiny_mlp_artifact / "manifest.json").read_text())
    assert manifest["signature"]["onnx"]["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [2, 64]},
        {"name": "y", "dtype": "float32", "shape": [1, 3, 16, 16]},
    ]
    assert [o["name"] for o in manifest["signature"]["built"]["outputs"]] == ["a", "b"]
    assert manifest["target"]["name"] == "host" and manifest["target"]["arch"] == "x86_64"
    # weights: Linear(64->32) + Conv2d(3->8, 3x3), float32, counted by hand
    assert manifest["memory"]["weights_bytes"] == (64 * 32 + 32 + 8 * 3 * 3 * 3 + 8) * 4
    # arena: the three tensors main allocates (fc output [2,32], conv output [1,8,14,14], scalar mean)
    assert manifest["memory"]["arena_bytes"]["main"] == 2 * 32 * 4 + 8 * 14 * 14 * 4 + 4
    for name, info in manifest["files"].items():
        data = (tiny_mlp_artifact / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    for key in ("edgecc", "apache-tvm", "apache-tvm-ffi", "onnx"):
        assert manifest["versions"][key]
    assert str(tiny_mlp.parent) not in json.dumps(manifest)  # no absolute paths


def test_symbolic_dims_are_kept_and_bound(tmp_path):
    import torch

    path = tmp_path / "dyn.onnx"
    torch.manual_seed(0)
    torch.onnx.export(torch.nn.Linear(16, 4).eval(), (torch.randn(2, 16),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    from edgecc.errors import EdgeccError

    with pytest.raises(EdgeccError, match="--dim batch"):
        build_artifact(path, tmp_path / "unbound")
    out = tmp_path / "bound"
    result = build_artifact(path, out, dims={"batch": 3})
    assert result.manifest["signature"]["onnx"]["inputs"][0]["shape"] == ["batch", 16]
    assert result.manifest["signature"]["built"]["inputs"][0]["shape"] == [3, 16]
    reports, _ = verify(out, path)
    _assert_all_pass(reports)


def test_cli_build_run_verify(cli, tiny_mlp, tmp_path):
    out = tmp_path / "art"
    result = cli("build", tiny_mlp, "-o", out)
    assert result.exit_code == 0, result.output
    assert "built" in result.output
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds_for_two_heads(5))
    result = cli("run", out, "--inputs", npz, "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as y:
        ref = onnxruntime_reference(tiny_mlp, feeds_for_two_heads(5))
        np.testing.assert_allclose(y["a"], ref["a"], rtol=1e-5, atol=1e-5)
    result = cli("verify", out, tiny_mlp, "--json", tmp_path / "v.json")
    assert result.exit_code == 0 and "verify: PASS" in result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True


def test_verify_fails_on_a_wrong_model(cli, tiny_mlp_artifact, tmp_path):
    """An artifact checked against a different model with the same signature must FAIL (exit 1)."""
    other = export_two_heads(tmp_path / "other.onnx", seed=123)
    result = cli("verify", tiny_mlp_artifact, other)
    assert result.exit_code == 1 and "verify: FAIL" in result.output


def _require_emulation(target: str):
    from edgecc.targets.registry import get_target

    status = get_target(target).sdk_status()
    if not status.can_run:
        pytest.skip(f"{target} cannot run here: {status.how_it_runs} (scripts/install.sh sets it up)")


@pytest.mark.cross
@pytest.mark.parametrize("target", ["arm-neon", "arm-dotprod", "arm-i8mm", "riscv64-rvv"])
@pytest.mark.parametrize("name", ["tiny-mlp", "tiny-cnn", "tiny-transformer"])
def test_synthetic_models_under_qemu_match_onnxruntime(name, target, tmp_path):
    _require_emulation(target)
    reports, *_ = _build_and_verify(name, tmp_path, target=target)
    _assert_all_pass(reports)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", pytest.param("arm-neon", marks=pytest.mark.cross)])
def test_minilm_embeddings_match_onnxruntime(target, tmp_path):
    from edgecc.models import minilm

    if target != "host":
        _require_emulation(target)
    feeds = minilm.tokenize(["edgecc compiles ONNX models for edge hardware."], seq_len=128)
    reports, *_ = _build_and_verify("minilm", tmp_path, target=target, feeds=feeds)
    _assert_all_pass(reports)
    emb = next(r for r in reports if r.name == "sentence_embedding")
    assert emb.cosine >= 0.9999


LIGHT_CNNS = ["resnet50", "densenet121", "inception-v1", "inception-v2", "alexnet", "squeezenet", "shufflenet",
              "vgg19", "zfnet512"]


# VGG-19 (20 GFLOP per image) takes 5-12 minutes under qemu-aarch64 on this machine: host only. The other
# eight cover the same op families on arm-neon.
LIGHT_CNN_CASES = [(n, "host") for n in LIGHT_CNNS] + [
    pytest.param(n, "arm-neon", marks=pytest.mark.cross) for n in LIGHT_CNNS if n != "vgg19"]


@pytest.mark.slow
@pytest.mark.parametrize("name,target", LIGHT_CNN_CASES)
def test_light_cnn_with_random_weights_matches_onnxruntime(name, target, tmp_path):
    if target != "host":
        _require_emulation(target)
    reports, *_ = _build_and_verify(f"{name}-rw", tmp_path, target=target)
    _assert_all_pass(reports)


@pytest.mark.parametrize("target", ["host", pytest.param("arm-neon", marks=pytest.mark.cross)])
def test_builds_are_byte_identical(target, tmp_path, monkeypatch):
    """Same model + options, different directories and times -> the same bytes in every file."""
    import shutil

    from edgecc.targets.registry import get_target

    spec = get_target(target)
    if spec.cross_compiler and shutil.which(spec.cross_compiler) is None:
        pytest.skip(f"{spec.cross_compiler} not installed (scripts/install.sh installs it)")
    digests = double_build_digests(tmp_path, monkeypatch, target=target)
    assert digests[0] == digests[1]
    assert {"manifest.json", "model.so", "params.bin"} <= set(digests[0])
