"""The pooling rule (`edgecc.schedules.pooling`): which pools it takes (unpadded max / average pools), and the
kernels against numpy float64 on odd rows (55, 13, 7: vectorized part plus scalar tail, or LLVM's loop), strides
1 and 2, windows 2 and 3, batch 2; a padded pool (or ceil mode) stays a row reduction; one case under qemu on
arm-neon."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax

from edgecc.schedules import schedule_report
from edgecc.targets.registry import get_target
from tests.test_schedules import _check, _module, _rand, _scheduled

R = relax.op


def _pool_ref64(x, kind, k, s):
    """NCHW pooling without padding, from the definition."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s:i * s + k, j * s:j * s + k]
            out[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("kind,shape,k,s", [
    ("max", (1, 16, 111, 111), 3, 2),  # SqueezeNet's: 55-wide rows (3 vectors + a 7-wide tail)
    ("max", (2, 5, 27, 27), 3, 2),  # batch 2
    ("max", (1, 7, 13, 13), 2, 1),  # 12-wide rows, stride 1
    ("avg", (1, 9, 14, 14), 3, 1),  # average: the division at the row
    ("avg", (1, 3, 32, 64), 2, 2),  # 32-wide rows: whole vectors
])
def test_pool_kernels_match_float64(kind, shape, k, s):
    op = R.nn.max_pool2d if kind == "max" else R.nn.avg_pool2d
    mod = _module([("x", shape)], lambda bb, x: op(x, pool_size=[k, k], strides=[s, s]))
    _check(mod, [_rand(*shape)], lambda x: _pool_ref64(x, kind, k, s), "pooling", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,pad,ceil", [("max", 1, False), ("avg", 1, False), ("max", 0, True)])
def test_padded_pool_stays_a_row_reduction(kind, pad, ceil):
    """Padding (explicit, or ceil mode's partial last window) keeps the row-reduction schedule."""
    op = R.nn.max_pool2d if kind == "max" else R.nn.avg_pool2d
    mod = _module([("x", (1, 8, 14, 14))],
                  lambda bb, x: op(x, pool_size=[3, 3], strides=[2, 2], padding=[pad] * 4, ceil_mode=ceil))
    assert set(schedule_report(_scheduled(mod)).values()) == {"reduction"}


@pytest.mark.cross
def test_pool_under_qemu_neon(neon_runs, tmp_path):
    from tests.test_schedules import run_on_neon

    neon = get_target("arm-neon")
    shape = (1, 6, 23, 23)
    mod = _module([("x", shape)], lambda bb, x: R.nn.max_pool2d(x, pool_size=[3, 3], strides=[2, 2]))
    assert "pooling" in schedule_report(_scheduled(mod, neon)).values()
    x = _rand(*shape)
    np.testing.assert_allclose(run_on_neon(mod, [x], tmp_path), _pool_ref64(x.astype(np.float64), "max", 3, 2),
                               rtol=1e-6, atol=1e-6)
