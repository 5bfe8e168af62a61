"""4-bit weights x int8 activations (`w4g<G>a8` schemes, edgecc/schedules/int4_dot.py): the int8 dot-product
kernel (AVX-512 VNNI here, Arm dotprod under qemu) and the generic kernel of the same scheme, against numpy
float64 on shapes that are not multiples of the register tile, and a whole build with `--quantize w4g32a8`."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecc.compress.rtn import quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.ir_passes.pipeline import relax_pipeline
from edgecc.runtime_bridge.params_file import write_params
from edgecc.schedules import int4_dot
from edgecc.schedules.int8_dot import dot_isa
from edgecc.schedules.quantized import quantized_matmul_primfunc
from edgecc.targets.registry import get_target

HOST = get_target("host")
DOTPROD = get_target("arm-dotprod")

# (scheme, rows, K, N): GEMV; odd rows; one column tile narrower than 64; several tiles; groups of 64/128
CASES = [("w4g32a8-asym", 1, 576, 192), ("w4g32a8", 3, 96, 48), ("w4g64a8-asym", 5, 128, 80),
         ("w4g128a8", 1, 256, 64), ("w4g32a8-asym", 7, 32, 16)]


def _case(scheme_name: str, m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed + m * 1000 + k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero group: scale 1, contributes 0
    if m > 2:
        x[2, 5] = 40.0  # an outlier: only its own group's grid coarsens
    return x, quantize_rtn(w, parse_scheme(scheme_name))


def _reference(x: np.ndarray, qt) -> np.ndarray:
    """float64: x rounded per row and group to int8 (scale max|x| / 127), times the dequantized weight."""
    m, k = x.shape
    g = qt.scheme.group_for(k)
    xg = x.reshape(m, k // g, g)
    amax = np.abs(xg).max(-1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    xq = np.clip(np.round(xg / sx), -127, 127) * sx.astype(np.float64)
    return xq.reshape(m, k) @ qt.dequantize()


def _arrays(x, qt) -> list[np.ndarray]:
    st = qt.tensors()
    return [x, st["weight"], st["scales"]] + ([st["zeros"]] if "zeros" in st else [])


def _module(kernel, arrays, m, n):
    bb = relax.BlockBuilder()
    params = [relax.Var(f"a{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function("main", params):
        gv = bb.add_func(kernel, "kernel")
        out = bb.emit(relax.call_tir(gv, params, relax.TensorType((m, n), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _run_host(kernel, arrays, m, n):
    ex = tvm.compile(_module(kernel, arrays, m, n), target=HOST.tvm(), relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def test_scheme_grammar_and_storage():
    s = parse_scheme("w4g32a8-asym")
    assert (s.bits, s.group_size, s.act_bits, s.symmetric, s.name) == (4, 32, 8, False, "w4g32a8-asym")
    assert not s.dot_layout and parse_scheme("w8a8").dot_layout
    # the same stored tensors as the weight-only scheme: a8 changes only how the kernel multiplies
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    a8, w4 = quantize_rtn(w, s).tensors(), quantize_rtn(w, parse_scheme("w4g32-asym")).tensors()
    assert a8.keys() == w4.keys() and all(np.array_equal(a8[k], w4[k]) for k in a8)
    with pytest.raises(Exception, match="int8 activations"):
        parse_scheme("w4a8")  # per-channel 4-bit: not supported
    with pytest.raises(Exception, match="int8 activations"):
        parse_scheme("w3g32a8")


@pytest.mark.parametrize("scheme,m,k,n", CASES)
def test_dot_kernel_on_host(scheme, m, k, n):
    isa = dot_isa(HOST.features)
    if isa != "avx512_vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    x, qt = _case(scheme, m, k, n)
    arrays = _arrays(x, qt)
    tile = arrays[2].shape[2]
    assert int4_dot.supports(isa, 4, qt.scheme.group_for(k), k, n, tile)
    kernel = int4_dot.int4_dot_matmul_kernel(k, n, qt.scheme.group_for(k), tile, isa, qt.scheme.symmetric, rows=m)
    np.testing.assert_allclose(_run_host(kernel, arrays, m, n), _reference(x, qt), rtol=1e-5, atol=1e-4)


# (scheme, rows hint, cores, m, K, N): the GEMV tilings a 2-core CPU gets (half-tile jobs: 576 columns, and 3
# tiles), rows unknown at build time (quantized in parallel, 4-row tiles), and codes and activations at their
# extremes in groups of 128 (the high nibbles' 16x sums).
TILINGS = [("w4g32a8-asym", 1, 2, 1, 576, 576), ("w4g32a8", 1, 2, 1, 256, 192),
           ("w4g32a8-asym", None, 2, 9, 96, 128), ("w4g128a8-asym", 1, 2, 1, 512, 128)]


@pytest.mark.parametrize("scheme,rows,cores,m,k,n", TILINGS)
def test_dot_kernel_tilings_on_host(scheme, rows, cores, m, k, n):
    isa = dot_isa(HOST.features)
    if isa != "avx512_vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    x, qt = _case(scheme, m, k, n, seed=7)
    if qt.scheme.group_for(k) == 128:  # largest |dot| per group: odd k (high nibbles) code 15 x 127
        x = np.where(np.arange(k) % 2 == 1, 5.0, -5.0)[None, :].astype(np.float32).repeat(m, 0)
        w = np.where(np.arange(k)[:, None] % 2 == 1, 1.0, -1.0) * np.ones((k, n))
        qt = quantize_rtn(w.astype(np.float32), qt.scheme)
    arrays = _arrays(x, qt)
    g, tile = qt.scheme.group_for(k), arrays[2].shape[2]
    kernel = int4_dot.int4_dot_matmul_kernel(k, n, g, tile, isa, qt.scheme.symmetric, rows=rows, cores=cores)
    np.testing.assert_allclose(_run_host(kernel, arrays, m, n), _reference(x, qt), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme,m,k,n", CASES + [("w4g32a8-asym", 9, 96, 64), ("w4g64a8", 16, 128, 48)])
def test_generic_kernel_computes_the_same_function(scheme, m, k, n):
    """The kernel a target without int8 dot products gets (and prefill's panel kernel, from 8 rows)."""
    x, qt = _case(scheme, m, k, n, seed=3)
    kernel, scheduled = quantized_matmul_primfunc(m, k, n, qt.scheme, target=None)
    assert scheduled
    np.testing.assert_allclose(_run_host(kernel, _arrays(x, qt), m, n), _reference(x, qt), rtol=1e-5, atol=1e-4)


def test_dispatch_gemv_to_dot_kernel_prefill_to_panel():
    target = HOST.tvm()
    if int4_dot.target_dot_isa(target) is None:
        pytest.skip("this CPU has no int8 dot product")
    s = parse_scheme("w4g32a8-asym")
    gemv, _ = quantized_matmul_primfunc(1, 576, 192, s, target)
    prefill, _ = quantized_matmul_primfunc(128, 576, 192, s, target)
    assert str(gemv.attrs["edgecc.schedule"]) == int4_dot.SCHEDULE_NAME
    assert "edgecc.schedule" not in (prefill.attrs or {})


@pytest.mark.cross
def test_dotprod_kernel_under_qemu(tmp_path):
    from edgecc.runtime_bridge.emulated import run_emulated

    if not DOTPROD.sdk_status().can_run:
        pytest.skip(f"arm-dotprod cannot run here: {DOTPROD.sdk_status().how_it_runs}")
    for i, (scheme, m, k, n) in enumerate(CASES):
        x, qt = _case(scheme, m, k, n, seed=7)
        arrays = _arrays(x, qt)
        tile = arrays[2].shape[2]
        kernel = int4_dot.int4_dot_matmul_kernel(k, n, qt.scheme.group_for(k), tile, "dotprod", qt.scheme.symmetric,
                                                 rows=m)
        ex = tvm.compile(_module(kernel, arrays, m, n), target=DOTPROD.tvm(), relax_pipeline=relax_pipeline(DOTPROD))
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        ex.export_library(str(case_dir / "model.so"), fcompile=tvm.support.cc.cross_compiler(DOTPROD.cross_compiler))
        assert b"sdot" in _disassembly(case_dir / "model.so")
        write_params(case_dir / "params.bin", [])
        (got,) = run_emulated(case_dir, DOTPROD, arrays)
        np.testing.assert_allclose(got, _reference(x, qt), rtol=1e-5, atol=1e-4, err_msg=f"{scheme} {m}x{k}x{n}")


def _disassembly(so) -> bytes:
    import shutil
    import subprocess

    objdump = shutil.which("aarch64-linux-gnu-objdump") or "objdump"
    return subprocess.run([objdump, "-d", str(so)], capture_output=True, check=True).stdout


def test_build_with_w4a8_matches_reference(tmp_path):
    """`build --quantize w4g32a8-asym` on a two-layer MLP: every matmul annotated with the scheme, and the
    artifact's output equals the float64 reference of the same quantized function."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((96, 128)).astype(np.float32) / 10
    w2 = rng.standard_normal((128, 64)).astype(np.float32) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    result = build_artifact(path, tmp_path / "art", target="host", quantize="w4g32a8-asym")
    comp = result.manifest["compression"]
    assert comp["scheme"] == "w4g32a8-asym" and len(comp["annotated_ops"]) == 2
    assert comp["packed_bytes"] == sum(parse_scheme("w4g32-asym").packed_nbytes(k, n) for k, n in ((96, 128),
                                                                                                    (128, 64)))
    x = rng.standard_normal((1, 96)).astype(np.float32)
    got = load_artifact(tmp_path / "art").run({"x": x})["y"]
    s = parse_scheme("w4g32a8-asym")
    h = np.maximum(_reference(x, quantize_rtn(w1, s)), 0).astype(np.float32)
    np.testing.assert_allclose(got, _reference(h, quantize_rtn(w2, s)), rtol=1e-4, atol=1e-4)
