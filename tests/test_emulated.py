"""Cross-compiled models run here under qemu-user (edgecc.runtime_bridge.emulated) and match onnxruntime.

Each model goes ONNX -> Relax (`from_onnx(keep_params_in_input=True)` + `detach_params`) -> `tvm.compile`
for the cross target -> `export_library` with the cross compiler, and its weights -> params.bin; then
`run_emulated` runs it with the foreign TVM runtime that scripts/install.sh puts in the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgecc.errors import EdgeccError
from edgecc.runtime_bridge import cross_runtime
from edgecc.runtime_bridge.emulated import run_emulated, runtime_available
from edgecc.runtime_bridge.params_file import write_params
from edgecc.targets.registry import get_target

CROSS_TARGETS = ["arm-neon", "riscv64-rvv"]


def _require_cross(spec):
    """Skip (with the fix) when this machine lacks the toolchain, emulator or foreign runtime."""
    missing = [tool for tool in (spec.cross_compiler, spec.emulator[0]) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{spec.name}: {', '.join(missing)} not installed "
                    f"(apt-get install -y {' '.join(spec.debian_packages)})")
    ok, note = runtime_available(spec)
    if not ok:
        pytest.skip(f"{spec.name}: {note}")


# -- models ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory) -> Path:
    """int64 token ids + float features -> (Linear output, per-token reduction): a Gather and two outputs."""
    import torch

    class EmbedTwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, ids, x):
            h = self.emb(ids) + x
            return self.fc(h), (h * x).sum(-1)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("emu_models") / "embed.onnx"
    ids = torch.zeros(2, 5, dtype=torch.int64)
    torch.onnx.export(EmbedTwoHeads().eval(), (ids, torch.randn(2, 5, 8)), str(path), input_names=["ids", "x"],
                      output_names=["y", "s"], dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="module")
def dtype_model(tmp_path_factory) -> Path:
    """No weights; float16, bool, int8, uint8 and int32 inputs and outputs."""
    import onnx
    from onnx import TensorProto, helper

    shape = [3, 4]
    inputs = [("a", TensorProto.FLOAT16), ("m", TensorProto.BOOL), ("q", TensorProto.INT8),
              ("u", TensorProto.UINT8), ("k", TensorProto.INT32)]
    nodes = [
        helper.make_node("Neg", ["a"], ["neg_a"]),
        helper.make_node("Where", ["m", "a", "neg_a"], ["where"]),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
        helper.make_node("Add", ["q32", "k"], ["sum"]),
        helper.make_node("Not", ["m"], ["not_m"]),
        helper.make_node("Add", ["u", "u"], ["u2"]),
    ]
    outputs = [("where", TensorProto.FLOAT16), ("sum", TensorProto.INT32), ("not_m", TensorProto.BOOL),
               ("u2", TensorProto.UINT8)]
    graph = helper.make_graph(nodes, "dtypes", [helper.make_tensor_value_info(n, t, shape) for n, t in inputs],
                              [helper.make_tensor_value_info(n, t, shape) for n, t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("emu_models") / "dtypes.onnx"
    onnx.save(model, str(path))
    return path


def _cross_compile(onnx_path: Path, spec, out_dir: Path) -> Path:
    """ONNX -> model.so (cross-compiled for spec) + params.bin; returns out_dir."""
    import onnx
    import tvm
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(onnx_path))
    initializers = {t.name for t in model.graph.initializer}
    num_inputs = len([i for i in model.graph.input if i.name not in initializers])
    mod, params = detach_params(from_onnx(model, keep_params_in_input=True))
    names = [v.name for v in mod["main"].params][num_inputs:]
    weights = [w.numpy() for w in params.get("main", [])]
    assert len(names) == len(weights)

    out_dir.mkdir(parents=True, exist_ok=True)
    executable = tvm.compile(mod, target=spec.tvm())
    executable.export_library(str(out_dir / "model.so"), fcompile=tvm.support.cc.cross_compiler(spec.cross_compiler))
    write_params(out_dir / "params.bin", list(zip(names, weights)))
    return out_dir


def _onnxruntime(onnx_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module", params=CROSS_TARGETS)
def embed_artifact(request, embed_model, tmp_path_factory):
    spec = get_target(request.param)
    _require_cross(spec)
    return spec, _cross_compile(embed_model, spec, tmp_path_factory.mktemp(f"embed-{spec.name}"))


# -- tests that run under qemu -------------------------------------------------------------------------


@pytest.mark.cross
def test_two_outputs_and_int64_input_match_onnxruntime(embed_artifact, embed_model):
    spec, artifact = embed_artifact
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 16, size=(2, 5), dtype=np.int64),
             "x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    outputs = run_emulated(artifact, spec, [feeds["ids"], feeds["x"]])
    expected = _onnxruntime(embed_model, feeds)
    assert len(outputs) == 2
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.cross
@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_dtypes_round_trip(target, dtype_model, tmp_path):
    spec = get_target(target)
    _require_cross(spec)
    artifact = _cross_compile(dtype_model, spec, tmp_path / "dtypes")
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((3, 4)).astype(np.float16),
             "m": rng.integers(0, 2, size=(3, 4)).astype(bool),
             "q": rng.integers(-128, 128, size=(3, 4)).astype(np.int8),
             "u": rng.integers(0, 256, size=(3, 4)).astype(np.uint8),
             "k": rng.integers(-1000, 1000, size=(3, 4)).astype(np.int32)}
    outputs = run_emulated(artifact, spec, list(feeds.values()))
    expected = _onnxruntime(dtype_model, feeds)
    assert [o.dtype for o in outputs] == [e.dtype for e in expected]
    for got, want in zip(outputs, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.cross
def test_runner_error_is_one_line(embed_artifact):
    spec, artifact = embed_artifact
    with pytest.raises(EdgeccError) as info:
        run_emulated(artifact, spec, [np.zeros((2, 5), dtype=np.int64)])  # the float input is missing
    message = str(info.value)
    assert "\n" not in message
    assert f"under {spec.emulator[0]} failed" in message and "arguments" in message


# -- tests that need no cross toolchain ----------------------------------------------------------------


def _fake_elf(path: Path, machine: int) -> Path:
    """Just enough of an ELF header for the architecture check."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header))
    return path


def test_missing_runtime_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path / "empty-cache"))
    spec = get_target("arm-neon")
    ok, note = runtime_available(spec)
    assert not ok and cross_runtime.install_command("aarch64") in note
    _fake_elf(tmp_path / "model.so", cross_runtime.ELF_MACHINES["aarch64"])
    with pytest.raises(EdgeccError) as info:
        run_emulated(tmp_path, spec, [])
    assert info.value.fix and "python -m edgecc.runtime_bridge.cross_runtime aarch64" in info.value.fix


def test_library_for_another_arch_is_rejected(tmp_path):
    _fake_elf(tmp_path / "model.so", cross_runtime.ELF_MACHINES["x86_64"])
    with pytest.raises(EdgeccError, match="built for x86_64, not aarch64"):
        run_emulated(tmp_path, get_target("arm-neon"), [])


@pytest.mark.parametrize("target", CROSS_TARGETS)
def test_model_without_kernels_links_for_the_target(target, tmp_path):
    """A graph with no kernel of its own (BitCast is a view): TVM packs its constants into an object that used
    to be built for the host (x86_64) and failed to link; it must link and run for the target."""
    import onnx
    from onnx import TensorProto, helper

    from edgecc.build import build_artifact

    spec = get_target(target)
    _require_cross(spec)
    node = helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.INT32)
    graph = helper.make_graph([node], "bitcast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])])
    path = tmp_path / "bitcast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)]), str(path))
    build_artifact(path, tmp_path / "art", target=target)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    (got,) = run_emulated(tmp_path / "art", spec, [x])
    np.testing.assert_array_equal(got, x.view(np.int32))
