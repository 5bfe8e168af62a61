"""The hand-written panel GEMV (`schedules/panel_gemv.py`): which einsums it takes, and its numbers against
numpy float64 on host and under qemu for arm-neon (shapes shorter than the prefetch distance, odd K, 1-4 rows)."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import tirx
from tvm.script import relax as R

from edgecc.schedules import SCHEDULE_ATTR, cpu_params
from edgecc.schedules.panel_gemv import PREFETCH_BYTES, match_panel_einsum
from edgecc.targets.registry import get_target
from tests.test_schedules import HOST, _check, _module, _rand, _scheduled, run_on_neon

LANES = cpu_params(HOST).lanes()


def _panel_module(m, k, panels, nr, spec_eq="mk,pkj->mpj", w_shape=None):
    return _module([("x", (m, k)), ("w", w_shape or (panels, k, nr))],
                   lambda bb, x, w: R.einsum((x, w), spec_eq))


def _panel_ref(x, w):
    return np.einsum("mk,pkj->mpj", x, w)


def _rules(sched) -> list[str]:
    return [str(f.attrs[SCHEDULE_ATTR]) for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)]


@pytest.mark.parametrize("m,k,panels,nr", [
    (1, 768, 12, 4 * LANES),  # a GPT GEMV panel: K longer than the prefetch distance
    (1, 37, 5, LANES),  # K shorter than the prefetch distance: no steady loop at all
    (3, 131, 3, 2 * LANES),  # odd K, three rows
    (4, 1, 1, LANES),  # one step
    (2, PREFETCH_BYTES // (4 * LANES) + 1, 2, LANES),  # one steady step, then the tail
])
def test_panel_gemv_numerics(m, k, panels, nr):
    x, w = _rand(m, k), _rand(panels, k, nr, seed=1)
    _check(_panel_module(m, k, panels, nr), [x, w], _panel_ref, "panel_gemv", rtol=1e-4, atol=1e-4)


def test_only_the_panel_einsum_is_taken(monkeypatch):
    nr = 4 * LANES
    # the panel einsum itself
    assert _rules(_scheduled(_panel_module(1, 64, 3, nr))) == ["panel_gemv"]
    # a transposed panel ("pjk"): the same operands, another access pattern -> the template
    trans = _module([("x", (1, 64)), ("w", (3, nr, 64))], lambda bb, x, w: R.einsum((x, w), "mk,pjk->mpj"))
    assert "panel_gemv" not in _rules(_scheduled(trans))
    # more rows than a GEMV -> the GEMM template
    many = cpu_params(HOST).gemv_max_rows + 1
    assert "panel_gemv" not in _rules(_scheduled(_panel_module(many, 64, 3, nr)))
    # half-vector panels (N = 1000 -> 40 columns) -> the template
    if LANES > 8:
        assert "panel_gemv" not in _rules(_scheduled(_panel_module(1, 64, 3, LANES // 2 * 5)))
    # a plain matmul is not a panel einsum
    plain = _module([("x", (1, 64)), ("w", (64, nr))], lambda bb, x, w: R.matmul(x, w))
    assert _rules(_scheduled(plain)) == ["matmul"]
    # the A/B switch
    monkeypatch.setenv("EDGECC_PANEL_GEMV", "0")
    assert _rules(_scheduled(_panel_module(1, 64, 3, nr))) == ["matmul"]


def test_match_reports_the_shapes():
    import tvm

    from edgecc.ir_passes.pipeline import legalize_and_fuse_passes

    mod = tvm.transform.Sequential(legalize_and_fuse_passes())(_panel_module(2, 40, 3, 16))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert [match_panel_einsum(f) for f in funcs] == [(2, 40, 3, 16, "float32")]


@pytest.mark.cross
def test_panel_gemv_neon_under_qemu(neon_runs, tmp_path):
    neon = get_target("arm-neon")
    m, k, panels, nr = 2, 301, 3, 4 * cpu_params(neon).lanes()
    mod = _panel_module(m, k, panels, nr)
    assert _rules(_scheduled(mod, neon)) == ["panel_gemv"]
    arrays = [_rand(m, k), _rand(panels, k, nr, seed=1)]
    got = run_on_neon(mod, arrays, tmp_path)
    np.testing.assert_allclose(got, _panel_ref(*[a.astype(np.float64) for a in arrays]), rtol=1e-4, atol=1e-4)
