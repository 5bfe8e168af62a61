"""The int8 dot-product w8a8 kernel (edgecc/schedules/int8_dot.py): AVX-512 VNNI and AVX-VNNI (ymm, built
for Alder Lake) on this host, Arm dotprod and Arm i8mm (smmla) under qemu, against numpy float64 on shapes
that are not multiples of the register tile (1 row, odd rows, K not a multiple of 4 or 8, a single partial
column tile, N not a multiple of 4)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecc.compress.schemes import column_tile
from edgecc.ir_passes.pipeline import relax_pipeline
from edgecc.runtime_bridge.params_file import write_params
from edgecc.schedules.int8_dot import (dot_isa, int8_dot_matmul_kernel, int8_isa, pack_k4, supports,
                                      target_dot_isa, target_int8_isa, unpack_k4)
from edgecc.targets.registry import get_target

HOST = get_target("host")
DOTPROD = get_target("arm-dotprod")
I8MM = get_target("arm-i8mm")

# (rows, K, N): GEMV, K % 4 != 0, odd rows, N one tile that is not 64 wide, several tiles
SHAPES = [(1, 576, 192), (5, 7, 48), (13, 130, 128), (1, 3, 16), (6, 64, 64)]


def _case(m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed + m * 1000 + k)
    codes = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = ((rng.random(n) + 0.5) / 100).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, 0] = 0.0
    if m > 2:
        x[2] = 0.0  # an all-zero row: scale 1, output 0
    return x, codes, scale


def _reference(x, codes, scale):
    """float64: the row quantization of the generic w8a8 kernel, then exact products."""
    amax = np.abs(x).max(1)
    sx = np.where(amax > 0, amax.astype(np.float32) / np.float32(127), np.float32(1)).astype(np.float32)
    xq = np.clip(np.round(x / sx[:, None]), -127, 127)
    return (xq @ codes.astype(np.float64)) * sx[:, None].astype(np.float64) * scale[None, :].astype(np.float64)


def _module(kernel, m, k, n, tile):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((n // tile, -(-k // 4), tile * 4), "int8"))
    s = relax.Var("s", relax.TensorType((n // tile, 1, tile), "float32"))
    with bb.function("main", [x, w, s]):
        gv = bb.add_func(kernel, "int8_dot_matmul")
        out = bb.emit(relax.call_tir(gv, [x, w, s], relax.TensorType((m, n), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _arrays(x, codes, scale):
    tile = column_tile(codes.shape[1])
    return [x, pack_k4(codes, tile), scale.reshape(-1, tile)[:, None, :].copy()]


def test_pack_k4_layout():
    """Element (k, c) sits at [c // T, k // 4, (c % T) * 4 + k % 4]; K padded with zeros; unpack inverts."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-128, 128, (10, 96)).astype(np.int8)
    packed = pack_k4(codes, 32)
    assert packed.shape == (3, 3, 128)
    for k, c in [(0, 0), (9, 95), (5, 33), (3, 64)]:
        assert packed[c // 32, k // 4, (c % 32) * 4 + k % 4] == codes[k, c]
    assert not packed[:, 2, :].reshape(3, 32, 4)[:, :, 2:].any()  # rows 10, 11: padding
    np.testing.assert_array_equal(unpack_k4(packed, 10), codes)


def test_isa_choice():
    assert dot_isa(("avx512f", "avx512bw", "avx512_vnni")) == "avx512_vnni"
    assert dot_isa(("neon", "dotprod")) == "dotprod"
    assert int8_isa(("neon", "dotprod", "i8mm")) == "i8mm" and int8_isa(("neon", "i8mm")) is None
    assert dot_isa(("neon", "dotprod", "i8mm")) == "dotprod"  # int4_dot's sdot kernel keeps sdot there
    assert int8_isa(("avx512f", "avx512bw", "avx512_vnni", "avx2", "avx_vnni")) == "avx512_vnni"
    assert int8_isa(("avx2", "avx_vnni")) == "avxvnni" and dot_isa(("avx2", "avx_vnni")) is None
    assert int8_isa(("avx2",)) is None
    assert dot_isa(("neon",)) is None and dot_isa(("avx2", "fma")) is None
    assert supports("avx512_vnni", 128, 64) and not supports("avx512_vnni", 40, 40)
    assert supports("dotprod", 40, 40) and not supports(None, 64, 64)
    assert supports("i8mm", 17, 17) and supports("i8mm", 3, 3) and not supports("dotprod", 17, 17)
    assert supports("avxvnni", 40, 40) and not supports("avxvnni", 36, 36)


def test_target_isa_from_llvm():
    """The isa comes from LLVM's view of the target: -mattr=+i8mm picks smmla, +dotprod alone sdot."""
    assert target_int8_isa(I8MM.tvm()) == "i8mm" and target_dot_isa(I8MM.tvm()) == "dotprod"
    assert target_int8_isa(DOTPROD.tvm()) == "dotprod"
    assert target_int8_isa(get_target("arm-neon").tvm()) is None


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_vnni_kernel_on_host(m, k, n):
    if dot_isa(HOST.features) != "avx512_vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    x, codes, scale = _case(m, k, n)
    tile = column_tile(n)
    mod = _module(int8_dot_matmul_kernel(k, n, tile, "avx512_vnni", rows=m), m, k, n, tile)
    ex = tvm.compile(mod, target=HOST.tvm(), relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in _arrays(x, codes, scale)]).numpy()
    np.testing.assert_allclose(got, _reference(x, codes, scale), rtol=1e-5, atol=1e-5)


#: an AVX2 CPU with AVX-VNNI and no AVX-512 (Alder Lake): vpdpbusd on ymm in its VEX encoding
ALDERLAKE = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake", "num-cores": 2}


@pytest.mark.parametrize("m,k,n", SHAPES + [(33, 68, 96)])
def test_avxvnni_kernel_on_host(tmp_path, m, k, n):
    """Built for Alder Lake (no AVX-512 at all), run here when this CPU has AVX-VNNI; the library must use
    the VEX form of vpdpbusd and no zmm register."""
    import subprocess

    target = tvm.target.Target(ALDERLAKE)
    assert target_int8_isa(target) == "avxvnni" and target_dot_isa(target) is None
    if "avx_vnni" not in HOST.features:
        pytest.skip("this CPU has no AVX-VNNI")
    x, codes, scale = _case(m, k, n)
    tile = column_tile(n)
    assert supports("avxvnni", n, tile)
    mod = _module(int8_dot_matmul_kernel(k, n, tile, "avxvnni", rows=m), m, k, n, tile)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(get_target("x86-avx2")))
    lib = tmp_path / "model.so"
    ex.export_library(str(lib))
    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "{vex} vpdpbusd" in asm and "zmm" not in asm
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in _arrays(x, codes, scale)]).numpy()
    np.testing.assert_allclose(got, _reference(x, codes, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.cross
def test_dotprod_kernel_under_qemu(tmp_path):
    from edgecc.runtime_bridge.emulated import run_emulated

    if not DOTPROD.sdk_status().can_run:
        pytest.skip(f"arm-dotprod cannot run here: {DOTPROD.sdk_status().how_it_runs}")
    for i, (m, k, n) in enumerate(SHAPES):
        x, codes, scale = _case(m, k, n, seed=7)
        tile = column_tile(n)
        mod = _module(int8_dot_matmul_kernel(k, n, tile, "dotprod", rows=m), m, k, n, tile)
        ex = tvm.compile(mod, target=DOTPROD.tvm(), relax_pipeline=relax_pipeline(DOTPROD))
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        ex.export_library(str(case_dir / "model.so"), fcompile=tvm.support.cc.cross_compiler(DOTPROD.cross_compiler))
        write_params(case_dir / "params.bin", [])
        (got,) = run_emulated(case_dir, DOTPROD, _arrays(x, codes, scale))
        np.testing.assert_allclose(got, _reference(x, codes, scale), rtol=1e-5, atol=1e-5, err_msg=f"{m}x{k}x{n}")


# i8mm: every combination of odd rows (1 = decode: sdot), K % 8 != 0 (5, 68) and N % 4 != 0 (3, 17)
I8MM_ROWS, I8MM_KS, I8MM_NS = (1, 3, 7, 33), (5, 68, 576), (3, 17, 96)


def _multi_module(cases):
    """One `main` calling one kernel per (m, k, n) case; inputs: per case x, weights, scales (in order)."""
    bb = relax.BlockBuilder()
    params, calls = [], []
    for i, (kernel, m, k, n, tile) in enumerate(cases):
        params += [relax.Var(f"x{i}", relax.TensorType((m, k), "float32")),
                   relax.Var(f"w{i}", relax.TensorType((n // tile, -(-k // 4), tile * 4), "int8")),
                   relax.Var(f"s{i}", relax.TensorType((n // tile, 1, tile), "float32"))]
    with bb.function("main", params):
        for i, (kernel, m, k, n, tile) in enumerate(cases):
            gv = bb.add_func(kernel, f"int8_mmla_{i}_{m}x{k}x{n}")
            calls.append(bb.emit(relax.call_tir(gv, params[3 * i:3 * i + 3], relax.TensorType((m, n), "float32"))))
        bb.emit_func_output(bb.emit(relax.Tuple(calls)))
    return bb.get()


@pytest.mark.cross
def test_i8mm_kernel_under_qemu(tmp_path):
    """All 36 shapes, plus the tiling for an unknown row count (dynamic sequence length), in one library
    (one compile, one qemu run); the library must use smmla (and sdot for the single-row case)."""
    import subprocess

    from edgecc.runtime_bridge.emulated import run_emulated

    if not I8MM.sdk_status().can_run:
        pytest.skip(f"arm-i8mm cannot run here: {I8MM.sdk_status().how_it_runs}")
    shapes = [(m, k, n, m) for m in I8MM_ROWS for k in I8MM_KS for n in I8MM_NS]
    shapes += [(m, k, n, None) for m in (1, 33) for k, n in ((68, 96), (576, 17))]
    cases, inputs, refs = [], [], []
    for m, k, n, rows in shapes:
        x, codes, scale = _case(m, k, n, seed=11 + n)
        tile = column_tile(n)
        assert supports("i8mm", n, tile)
        cases.append((int8_dot_matmul_kernel(k, n, tile, "i8mm", rows=rows), m, k, n, tile))
        inputs += _arrays(x, codes, scale)
        refs.append(_reference(x, codes, scale))
    ex = tvm.compile(_multi_module(cases), target=I8MM.tvm(), relax_pipeline=relax_pipeline(I8MM))
    lib = tmp_path / "model.so"
    ex.export_library(str(lib), fcompile=tvm.support.cc.cross_compiler(I8MM.cross_compiler))
    asm = subprocess.run([*I8MM.objdump, str(lib)], capture_output=True, text=True, check=True).stdout
    assert "smmla\t" in asm and "sdot\t" in asm
    write_params(tmp_path / "params.bin", [])
    outs = run_emulated(tmp_path, I8MM, inputs)
    assert len(outs) == len(shapes)
    for (m, k, n, rows), got, ref in zip(shapes, outs, refs):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{m}x{k}x{n} rows hint {rows}")
