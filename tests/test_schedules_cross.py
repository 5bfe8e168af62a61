"""Default schedules on arm-neon, run under qemu: numerics on shapes that are not multiples of the tiles.

The host tests (test_schedules.py) check every rule on x86. Here the same kinds of kernels are built for
aarch64 (128-bit NEON, so different vector widths and tiles) and run under qemu-aarch64. They are compared
with numpy in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecc.ir_passes.pipeline import legalize_and_fuse_passes
from edgecc.schedules import cpu_schedule_passes, schedule_report
from edgecc.targets.registry import get_target
from test_schedules import _module, run_on_neon  # the same helpers as the host tests

R = relax.op
NEON = get_target("arm-neon")

pytestmark = pytest.mark.cross


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layernorm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b


def _conv(x, w, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = xp.shape
    f, _, kh, kw = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,fc->nfhw", xp[:, :, i:i + oh, j:j + ow], w[:, :, i, j])
    return out


CASES = {
    "dense_37x29x67": ([("a", (37, 29)), ("b", (29, 67))], lambda bb, a, b: R.matmul(a, b), lambda a, b: a @ b,
                       "matmul"),
    "gemv_1x17x33": ([("a", (1, 17)), ("b", (17, 33))], lambda bb, a, b: R.matmul(a, b), lambda a, b: a @ b,
                     "matmul"),
    "dense_bias_gelu_13x31x45": (
        [("a", (13, 31)), ("b", (31, 45)), ("c", (45,))],
        lambda bb, a, b, c: R.nn.gelu(R.add(R.matmul(a, b), c)),
        lambda a, b, c: 0.5 * (a @ b + c) * (1 + np.vectorize(__import__("math").erf)((a @ b + c) / np.sqrt(2))),
        "matmul"),
    "batched_3x17x9x21": ([("a", (3, 17, 9)), ("b", (3, 9, 21))], lambda bb, a, b: R.matmul(a, b),
                          lambda a, b: a @ b, "matmul"),
    "conv3x3_5x11x13_f12": ([("x", (1, 5, 11, 13)), ("w", (12, 5, 3, 3))],
                            lambda bb, x, w: R.nn.conv2d(x, w, padding=1), lambda x, w: _conv(x, w, 1), "conv2d"),
    # 7 output channels: no NEON width divides it, so the conv rule declines and the fallback takes it
    "conv3x3_5x11x13_f7": ([("x", (1, 5, 11, 13)), ("w", (7, 5, 3, 3))],
                           lambda bb, x, w: R.nn.conv2d(x, w, padding=1), lambda x, w: _conv(x, w, 1), "reduction"),
    "softmax_3x7x37": ([("x", (3, 7, 37))], lambda bb, x: R.nn.softmax(x), _softmax, "reduction"),
    "layernorm_5x33": ([("x", (5, 33)), ("g", (33,)), ("b", (33,))],
                       lambda bb, x, g, b: R.nn.layer_norm(x, g, b, axes=[-1]), _layernorm, "reduction"),
    "elementwise_3x5x67": ([("x", (3, 5, 67)), ("y", (3, 5, 67))],
                           lambda bb, x, y: R.multiply(R.tanh(x), R.add(y, x)),
                           lambda x, y: np.tanh(x) * (y + x), "elementwise"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_neon_schedule_numerics_under_qemu(case, neon_runs, tmp_path):
    inputs, body, ref, rule = CASES[case]
    mod = _module(inputs, body)
    with NEON.tvm():
        scheduled = tvm.transform.Sequential(legalize_and_fuse_passes() + cpu_schedule_passes(NEON))(mod)
    assert rule in schedule_report(scheduled).values(), schedule_report(scheduled)

    rng = np.random.default_rng(len(case))
    arrays = [rng.standard_normal(shape).astype("float32") for _, shape in inputs]
    got = run_on_neon(mod, arrays, tmp_path)
    want = ref(*[a.astype(np.float64) for a in arrays])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
