"""The target registry, toolchain detection, vendor plugins, and the code each target gets."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import metadata

import numpy as np
import pytest

from edgecc.errors import EdgeccError
from edgecc.targets.registry import TargetSpec, all_targets, get_target

REQUIRED = ["host", "x86-avx2", "x86-avxvnni", "x86-avx512", "arm-neon", "arm-dotprod", "arm-i8mm", "riscv64-rvv", "cuda"]


def test_registry_has_the_required_targets():
    names = [t.name for t in all_targets()]
    for name in REQUIRED:
        assert name in names


def test_every_target_resolves_to_a_tvm_target():
    for spec in all_targets():
        target = spec.tvm()
        assert target.kind.name == spec.tvm_target["kind"]


def test_host_detection_matches_cpuinfo():
    import platform

    host = get_target("host")
    assert host.arch == platform.machine()
    flags = open("/proc/cpuinfo").read()
    if " avx512f " in flags:
        assert "avx512f" in host.features and host.vector_bits == 512
    elif " avx2 " in flags:
        assert "avx2" in host.features and host.vector_bits == 256


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(EdgeccError) as info:
        get_target("pdp11")
    for name in REQUIRED:
        assert name in str(info.value)


def test_targets_command_reports_toolchains(cli):
    result = cli("targets", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["host"]["can_build"] and rows["host"]["can_run"]
    neon = rows["arm-neon"]
    assert neon["can_build"] == (shutil.which("aarch64-linux-gnu-g++") is not None)
    if not neon["can_build"]:
        assert "apt-get install" in neon["install"]
    assert rows["cuda"]["can_build"]
    table = cli("targets")
    assert table.exit_code == 0 and "riscv64-rvv" in table.output


class _FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self._obj, self.dist = name, f"acme:{name}", obj, None

    def load(self):
        return self._obj


def _patch_plugins(monkeypatch, *entries):
    real = metadata.entry_points

    def fake(**kwargs):
        if kwargs.get("group") == "edgecc.targets":
            return list(entries)
        return real(**kwargs)

    monkeypatch.setattr("edgecc.targets.registry.metadata.entry_points", fake)


def test_vendor_plugin_target_is_registered(monkeypatch):
    spec = TargetSpec(name="acme-a55", description="ACME board", arch="aarch64",
                      tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"},
                      features=("neon",), cross_compiler="aarch64-linux-gnu-g++")
    _patch_plugins(monkeypatch, _FakeEntryPoint("acme", lambda: [spec]))
    found = get_target("acme-a55")
    assert found.plugin == "acme" and found.tvm().kind.name == "llvm"


def test_broken_or_clashing_plugins_are_user_errors(monkeypatch):
    _patch_plugins(monkeypatch, _FakeEntryPoint("bad", lambda: 42))
    with pytest.raises(EdgeccError, match="not an edgecc TargetSpec"):
        all_targets()
    assert get_target("host").name == "host"  # built-in targets resolve without the plugins
    with pytest.raises(EdgeccError, match="not an edgecc TargetSpec"):
        get_target("acme-a55")

    def fail():
        raise ModuleNotFoundError("No module named 'acme_npu'")

    _patch_plugins(monkeypatch, _FakeEntryPoint("gone", fail))
    with pytest.raises(EdgeccError, match="'gone'.*failed to load: No module named 'acme_npu'"):
        get_target("acme-a55")
    assert get_target("arm-neon").arch == "aarch64"
    clash = TargetSpec(name="host", description="x", arch="x86_64", tvm_target={"kind": "llvm"})
    _patch_plugins(monkeypatch, _FakeEntryPoint("clash", clash))
    with pytest.raises(EdgeccError, match="already exists"):
        all_targets()


ELF_MACHINES = {62: "x86_64", 183: "aarch64", 243: "riscv64"}


def _elf_machine(path) -> str:
    """e_machine from the ELF header (offset 18, little-endian u16)."""
    header = open(path, "rb").read(20)
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return ELF_MACHINES.get(int.from_bytes(header[18:20], "little"), "unknown")


def _disassembly(spec, path) -> str:
    return subprocess.run([*spec.objdump, str(path)], capture_output=True, text=True, check=True).stdout


CROSS_CASES = [
    ("arm-neon", "aarch64", ("fmla", "ld1")),
    ("arm-dotprod", "aarch64", ("fmla",)),
    ("riscv64-rvv", "riscv64", ("vsetvli", "vle32")),
]


@pytest.mark.cross
@pytest.mark.parametrize("name,machine,mnemonics", CROSS_CASES)
def test_cross_build_is_target_elf_with_vector_code(name, machine, mnemonics, tmp_path):
    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS

    spec = get_target(name)
    if shutil.which(spec.cross_compiler) is None or shutil.which(spec.objdump[0]) is None:
        pytest.skip(f"{spec.cross_compiler} / {spec.objdump[0]} not installed (scripts/install.sh installs them)")
    onnx_path = MODELS["tiny-transformer"].export(tmp_path / "t.onnx")
    out = tmp_path / name
    build_artifact(onnx_path, out, target=name)
    assert _elf_machine(out / "model.so") == machine
    asm = _disassembly(spec, out / "model.so")
    for mnemonic in mnemonics:
        assert mnemonic in asm, f"{mnemonic} not in the {name} disassembly"


@pytest.mark.parametrize("scheme", ["w8a8", "w4g32a8"])
def test_avxvnni_target_uses_vex_dot_products(tmp_path, scheme):
    """x86-avxvnni (Alder Lake: AVX-VNNI, no AVX-512): the int8 dot-product kernels in their VEX (ymm) form, no
    zmm anywhere; where this CPU has AVX-VNNI the build runs here and computes what the host build computes."""
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact
    from tests.conftest import export_mlp_onnx

    onnx_path, w = export_mlp_onnx(tmp_path / "mlp.onnx", k=96, hidden=64, n=40, batch=1)
    spec = get_target("x86-avxvnni")
    build_artifact(onnx_path, tmp_path / "vnni", target=spec.name, quantize=scheme)
    asm = _disassembly(spec, tmp_path / "vnni" / "model.so")
    assert "{vex} vpdpbusd" in asm and "zmm" not in asm
    if "avx_vnni" not in get_target("host").features:
        pytest.skip("this CPU has no AVX-VNNI: built and disassembled only")
    build_artifact(onnx_path, tmp_path / "host", target="host", quantize=scheme)
    x = np.random.default_rng(5).standard_normal((1, 96)).astype(np.float32)
    got = load_artifact(tmp_path / "vnni").run({"x": x})["y"]
    np.testing.assert_allclose(got, load_artifact(tmp_path / "host").run({"x": x})["y"], rtol=1e-4, atol=1e-4)
    # and both are the fp32 model up to the quantization error (4-bit codes of Gaussian weights: ~9% per layer)
    ref = np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0) @ w["w2t"] + w["b2"]
    assert np.linalg.norm(got - ref) < (0.05 if scheme == "w8a8" else 0.2) * np.linalg.norm(ref)


def test_avx512_build_uses_zmm(tmp_path):
    from edgecc.build import build_artifact
    from edgecc.models.registry import MODELS

    onnx_path = MODELS["tiny-mlp"].export(tmp_path / "m.onnx")
    build_artifact(onnx_path, tmp_path / "a", target="x86-avx512")
    asm = _disassembly(get_target("x86-avx512"), tmp_path / "a" / "model.so")
    assert "zmm" in asm and "vfmadd" in asm
