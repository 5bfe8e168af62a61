"""4-bit weights x float activations for decode GEMVs (edgecc/schedules/int4_float.py): the hand-written kernel
(AVX-512 with its shifted and paired decodes and AVX2 here, NEON under qemu; AVX2 and NEON are opt-in) and
the generic kernel of the same scheme against the float64 product of x and the dequantized weight, on rows
1..4, groups 32/64/128 and per channel, symmetric and asymmetric codes, and column counts that do not split
evenly into jobs; then which kernel the dispatch picks."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecc.compress.rtn import QuantizedTensor, pack_bits, quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.ir_passes.pipeline import relax_pipeline
from edgecc.schedules import int4_float
from edgecc.schedules.quantized import quantized_matmul_primfunc
from edgecc.targets.registry import get_target
from tests.test_int4_dot import _module  # the same one-kernel Relax module

HOST = get_target("host")

# (scheme, rows, K, N): 9 column tiles (576: no even split at 4 vectors a job); one tile of 48 or 80 columns
# (not a multiple of 64); several tiles; groups of 64 and 128; one group per column (per channel)
CASES = [("w4g32-asym", 1, 576, 576), ("w4g32", 2, 96, 48), ("w4g64-asym", 3, 128, 80), ("w4g128", 4, 256, 192),
         ("w4g128-asym", 1, 384, 128), ("w4g64", 4, 192, 576), ("w4", 1, 96, 64), ("w4g32-asym", 3, 64, 320)]


def _case(scheme_name: str, m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed + 100 * m + k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero group
    if m > 1:
        x[1, 7] = 1e3  # an outlier: its group's sum cancels against the codes' implicit 1.0
    return x, quantize_rtn(w, parse_scheme(scheme_name))


def _arrays(x, qt) -> list[np.ndarray]:
    st = qt.tensors()
    return [x, st["weight"], st["scales"]] + ([st["zeros"]] if "zeros" in st else [])


def _check(got, x, qt):
    """Against float64. Both kernels sum codes 0..15 times x per group and cancel the zero point (and this
    kernel the codes' implicit 1.0) against the group sum of x, so their fp32 error scales with
    sum_k |x| * 16 * scale, not with sum |x| |w|: allowed 1e-6 of that (~16 ulps; seen <= 4.3e-7, generic 3.5e-7)."""
    ref = x.astype(np.float64) @ qt.dequantize()
    scales = np.repeat(qt.scales.astype(np.float64), qt.group, axis=0)
    bound = np.abs(x).astype(np.float64) @ (16 * scales)
    err = np.abs(got - ref) / np.maximum(bound, 1e-30)
    assert err.max() < 1e-6, f"max error {err.max():.2e} of sum |x| 16 scale"


def _run(kernel, arrays, m, n, target):
    ex = tvm.compile(_module(kernel, arrays, m, n), target=target, relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _kernel(qt, m, k, n, lanes_regs, cores=2, paired=False):
    tile = qt.scheme.stored_shapes(k, n)["scales"][0][2]
    assert int4_float.supports(lanes_regs, 4, qt.scheme.group_for(k), k, n, tile, m)
    return int4_float.int4_float_matmul_kernel(m, k, n, qt.scheme.group_for(k), tile, lanes_regs[0],
                                               qt.scheme.symmetric, lanes_regs[1], cores=cores, paired=paired)


@pytest.mark.parametrize("decode", ["shifted", "paired"])
@pytest.mark.parametrize("scheme,m,k,n", CASES)
def test_kernel_on_host(scheme, m, k, n, decode):
    lanes_regs = int4_float.target_lanes(HOST.tvm())
    if lanes_regs is None:
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    paired = decode == "paired"
    if paired and not int4_float.has_pair_decode(HOST.tvm()):
        pytest.skip("this CPU has no AVX-512 VBMI")
    x, qt = _case(scheme, m, k, n)
    kernel = _kernel(qt, m, k, n, lanes_regs, paired=paired)
    assert ("pmultishift" in kernel.script()) == paired
    _check(_run(kernel, _arrays(x, qt), m, n, HOST.tvm()), x, qt)


@pytest.mark.parametrize("scheme,m,k,n", CASES[:4])
def test_generic_kernel_computes_the_same_function(scheme, m, k, n):
    """The kernel of targets without the hand-written one (and of more than MAX_ROWS rows)."""
    x, qt = _case(scheme, m, k, n, seed=1)
    kernel, scheduled = quantized_matmul_primfunc(m, k, n, qt.scheme, target=None)
    assert scheduled and "edgecc.schedule" not in (kernel.attrs or {})
    _check(_run(kernel, _arrays(x, qt), m, n, HOST.tvm()), x, qt)


def test_extreme_codes_and_one_core_split():
    """Codes 0 and 15 only (every nibble position set or clear), large activations, jobs for one core."""
    lanes_regs = int4_float.target_lanes(HOST.tvm())
    if lanes_regs is None:
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    m, k, n = 2, 128, 64
    rng = np.random.default_rng(4)
    codes = np.where((np.arange(k)[:, None] + np.arange(n)[None, :]) % 3 == 0, 15, 0)
    zeros = rng.integers(0, 16, (k // 32, n)).astype(np.uint8)
    scales = (rng.random((k // 32, n)) + 0.5).astype(np.float32)
    qt = QuantizedTensor(parse_scheme("w4g32-asym"), pack_bits(codes, 4), scales, zeros, (k, n))
    x = np.full((m, k), 50.0, np.float32)
    x[1, ::2] = -50.0
    for paired in (False, True) if int4_float.has_pair_decode(HOST.tvm()) else (False,):
        _check(_run(_kernel(qt, m, k, n, lanes_regs, cores=1, paired=paired), _arrays(x, qt), m, n, HOST.tvm()),
               x, qt)


def test_avx2_kernel_on_host():
    """The 8-lane, 16-register variant (AVX2 CPUs), run here when this CPU has AVX2."""
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    if "avx2" not in HOST.features:
        pytest.skip("this CPU has no AVX2")
    lanes_regs = int4_float.target_lanes(avx2)
    assert lanes_regs == (8, 16)
    for scheme, m, k, n in (CASES[0], CASES[3]):
        x, qt = _case(scheme, m, k, n, seed=2)
        _check(_run(_kernel(qt, m, k, n, lanes_regs), _arrays(x, qt), m, n, avx2), x, qt)


def test_dispatch(monkeypatch):
    target = HOST.tvm()
    if int4_float.target_lanes(target) is None:
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    s = parse_scheme("w4g32-asym")

    def name(m, scheme=s, tgt=target):
        func, _ = quantized_matmul_primfunc(m, 576, 192, scheme, tgt)
        return str((func.attrs or {}).get("edgecc.schedule", ""))

    assert name(1) == name(4) == int4_float.SCHEDULE_NAME
    assert name(5) != int4_float.SCHEDULE_NAME and name(tvm.tirx.Var("m", "int64")) != int4_float.SCHEDULE_NAME
    assert name(1, parse_scheme("w8")) != int4_float.SCHEDULE_NAME
    assert name(1, tgt=tvm.target.Target("llvm")) != int4_float.SCHEDULE_NAME  # generic x86-64: no AVX2
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert name(1, tgt=haswell) != int4_float.SCHEDULE_NAME  # AVX2: opt-in
    monkeypatch.setenv("EDGECC_INT4_FLOAT", "1")
    assert name(1, tgt=haswell) == int4_float.SCHEDULE_NAME
    monkeypatch.setenv("EDGECC_INT4_FLOAT", "0")
    assert name(1) != int4_float.SCHEDULE_NAME
    monkeypatch.delenv("EDGECC_INT4_FLOAT")

    def paired(tgt):
        func, _ = quantized_matmul_primfunc(1, 576, 192, s, tgt)
        return "pmultishift" in func.script()

    # the paired decode where the target has AVX-512 VBMI (Zen 4 here: compiled, not run), else the shifted one
    assert paired(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
    assert not paired(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))  # AVX-512 without VBMI
    assert not paired(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    monkeypatch.setenv("EDGECC_INT4_PAIRED", "0")
    assert not paired(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))


@pytest.mark.cross
def test_neon_kernel_under_qemu(neon_runs, tmp_path, monkeypatch):
    from tests.test_schedules import run_on_neon

    monkeypatch.setenv("EDGECC_INT4_FLOAT", "1")  # opt-in on Arm (not timed on a real core)

    neon = get_target("arm-neon").tvm()
    lanes_regs = int4_float.target_lanes(neon)
    assert lanes_regs == (4, 32)
    scheme, m, k, n = "w4g64-asym", 3, 128, 80
    x, qt = _case(scheme, m, k, n, seed=3)
    kernel, _ = quantized_matmul_primfunc(m, k, n, qt.scheme, neon)
    assert str(kernel.attrs["edgecc.schedule"]) == int4_float.SCHEDULE_NAME
    arrays = _arrays(x, qt)
    _check(run_on_neon(_module(kernel, arrays, m, n), arrays, tmp_path), x, qt)
