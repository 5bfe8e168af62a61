"""Every user mistake gets one line naming the problem and the fix, a non-zero exit, and no artifact."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import feeds_for_two_heads


def _assert_user_error(result, *needles: str):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.startswith("edgecc: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert "(fix:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_file(cli, tmp_path):
    out = tmp_path / "out"
    _assert_user_error(cli("build", tmp_path / "nope.onnx", "-o", out), "does not exist")
    assert not out.exists()


def test_not_onnx(cli, tmp_path):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("this is a text file, not a protobuf\n" * 20)
    out = tmp_path / "out"
    _assert_user_error(cli("build", bogus, "-o", out), "not a readable ONNX model")
    assert not out.exists()


def test_truncated_onnx(cli, tiny_mlp, tmp_path):
    data = tiny_mlp.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_user_error(cli("build", cut, "-o", out), "cut.onnx")
    assert not out.exists()


def _external_data_model(tmp_path):
    weight = np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 1000
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    return path, weight


def test_external_data_loads(tmp_path):
    from edgecc.frontend.loader import load_model

    path, weight = _external_data_model(tmp_path)
    model = load_model(path)
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), weight)


def test_missing_external_data(cli, tmp_path):
    path, _ = _external_data_model(tmp_path)
    (tmp_path / "ext.weights").unlink()
    out = tmp_path / "out"
    _assert_user_error(cli("build", path, "-o", out), "ext.weights", "missing")
    assert not out.exists()


def test_unsupported_op_names_op_and_node(cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="act"), helper.make_node("Det", ["r"], ["y"], name="det_node")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    out = tmp_path / "out"
    _assert_user_error(cli("build", path, "-o", out), "Det", "det_node")
    assert not out.exists()
    # inspect reports it too, before trying to import
    result = cli("inspect", path)
    assert result.exit_code == 0 and "det_node" in result.output


def test_unknown_target_lists_valid_ones(cli, tiny_mlp, tmp_path):
    line = _assert_user_error(cli("build", tiny_mlp, "-t", "z80", "-o", tmp_path / "out"), "z80")
    for name in ("host", "arm-neon", "riscv64-rvv", "cuda"):
        assert name in line
    assert not (tmp_path / "out").exists()


def test_missing_cross_toolchain(cli, tiny_mlp, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    line = _assert_user_error(cli("build", tiny_mlp, "-t", "arm-neon", "-o", tmp_path / "out"),
                              "aarch64-linux-gnu-g++")
    assert "apt-get install" in line
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(cli, tiny_mlp, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_user_error(cli("build", tiny_mlp, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_build_leaves_nothing(cli, tiny_mlp, tmp_path, monkeypatch):
    """A failure mid-build (here: in linking) leaves neither the output nor a temp directory behind."""
    import edgecc.build as build_mod
    from edgecc.errors import EdgeccError

    def broken_export(*_args, **_kwargs):
        raise EdgeccError("linker failed (simulated)", "none")

    monkeypatch.setattr(build_mod, "_export_library", broken_export)
    _assert_user_error(cli("build", tiny_mlp, "-o", tmp_path / "out"), "simulated")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda f: {**f, "z": f["x"]}, "unknown input name"),
    (lambda f: {"x": f["x"]}, "input 'y' is missing"),
    (lambda f: {**f, "x": f["x"][:1]}, "shape [1, 64]"),
    (lambda f: {**f, "x": f["x"].astype(np.float64)}, "dtype float64"),
])
def test_run_rejects_wrong_inputs(cli, tiny_mlp_artifact, tmp_path, mutate, needle):
    feeds = mutate(feeds_for_two_heads())
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds)
    _assert_user_error(cli("run", tiny_mlp_artifact, "--inputs", npz, "-o", tmp_path / "y.npz"), needle)
    assert not (tmp_path / "y.npz").exists()


def test_run_rejects_corrupted_artifact(cli, tiny_mlp_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mlp_artifact, broken)
    with open(broken / "params.bin", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds_for_two_heads())
    _assert_user_error(cli("run", broken, "--inputs", npz, "-o", tmp_path / "y.npz"), "params.bin", "hash")


def test_bad_dim_binding(cli, tiny_mlp, tmp_path):
    _assert_user_error(cli("build", tiny_mlp, "--dim", "batch", "-o", tmp_path / "out"), "--dim")
    _assert_user_error(cli("build", tiny_mlp, "--dim", "seq=4", "-o", tmp_path / "out"), "seq")


def test_run_rejects_out_of_range_token_ids(cli, tmp_path):
    """Token ids past the embedding table would be read out of bounds by the compiled gather."""
    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS

    entry = MODELS["tiny-transformer"]
    onnx_path = entry.export(tmp_path / "t.onnx")
    build_artifact(onnx_path, tmp_path / "art")
    feeds = entry.feeds(seed=0)
    name = next(k for k, v in feeds.items() if v.dtype == np.int64)
    feeds[name] = feeds[name].copy()
    feeds[name].flat[0] = 10**6
    npz = tmp_path / "in.npz"
    np.savez(npz, **feeds)
    _assert_user_error(cli("run", tmp_path / "art", "--inputs", npz, "-o", tmp_path / "y.npz"),
                       f"input '{name}'", "outside the table")


def test_models_export_to_a_directory_is_a_one_line_error(cli, tmp_path):
    result = cli("models", "export", "tiny-cnn", "-o", tmp_path)
    assert result.exit_code == 2, result.output
    assert "is a directory" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
