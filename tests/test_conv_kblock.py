"""K-blocked convolutions (`contraction._k_chunk`): small outputs with long reductions split the reduction
into chunks that serve every row of a panel. Checked on the IR (the update block's channel axis is bound to
`chunk_outer * chunk + chunk_inner`, or not) and numerically against numpy float64 on odd shapes, with and
without a fused epilogue."""

from __future__ import annotations

import numpy as np
import pytest
import tvm_ffi
from tvm import relax, s_tir, tirx

from edgecc.schedules import SCHEDULE_ATTR, cpu_params
from edgecc.schedules.contraction import Contraction, _k_chunk
from edgecc.targets.registry import get_target
from tests.test_schedules import HOST, _check, _conv_ref64, _module, _rand

R = relax.op


def _update_reduce_bindings(func) -> list:
    """The values bound to the reduction iterators of every `*_update` block."""
    out = []

    def visit(realize):
        if realize.block.name_hint.endswith("_update"):
            for iv, val in zip(realize.block.iter_vars, realize.iter_values):
                if int(iv.iter_type) == tirx.IterVar.CommReduce:
                    out.append(val)

    tvm_ffi.structural_walk(func.body, (s_tir.SBlockRealize, visit), order="pre")
    return out


def _is_k_blocked(sched) -> bool:
    (func,) = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)
               and "conv2d" in str(f.attrs.get(SCHEDULE_ATTR, ""))]
    return any(not isinstance(v, (tirx.Var, tirx.IntImm)) for v in _update_reduce_bindings(func))


@pytest.mark.parametrize("c,h,w,f,kh,stride,pad,blocked", [
    (300, 7, 7, 256, 1, 1, 0, True),  # chunks of 100 channels
    (520, 5, 7, 272, 1, 1, 0, True),  # 272 channels: 17 half-width panels (16), chunks of 260
    (40, 6, 5, 256, 3, 1, 1, True),  # 3x3: the window stays whole in a chunk (10 channels x 9)
    (37, 9, 9, 256, 3, 2, 1, True),  # prime channel count, stride 2: chunks of one channel
    (300, 28, 28, 256, 1, 1, 0, False),  # 28x28 x 32 outputs per panel: accumulator over L1, not blocked
    (64, 7, 7, 256, 1, 1, 0, False),  # short reduction: one chunk, not blocked
])
def test_conv2d_k_blocked_numerics(c, h, w, f, kh, stride, pad, blocked):
    mod = _module([("x", (1, c, h, w)), ("k", (f, c, kh, kh))],
                  lambda bb, x, k: R.nn.conv2d(x, k, strides=stride, padding=pad))
    sched = _check(mod, [_rand(1, c, h, w), _rand(f, c, kh, kh)],
                   lambda x, k: _conv_ref64(x, k, stride, pad), "conv2d", rtol=1e-4, atol=1e-3)
    assert _is_k_blocked(sched) == blocked


def test_conv2d_k_blocked_fused_epilogue():
    # folded batch norm + residual + ReLU, fused at the panel (the K-blocked accumulator's tile)
    c, h, w, f = 300, 7, 9, 256
    mod = _module([("x", (1, c, h, w)), ("k", (f, c, 1, 1)), ("s", (1, f, 1, 1)), ("b", (1, f, 1, 1)),
                   ("r", (1, f, h, w))],
                  lambda bb, x, k, s, b, r: R.nn.relu(bb.emit(R.add(bb.emit(R.add(bb.emit(R.multiply(
                      bb.emit(R.nn.conv2d(x, k)), s)), b)), r))))
    inputs = [_rand(1, c, h, w), _rand(f, c, 1, 1), _rand(1, f, 1, 1), _rand(1, f, 1, 1), _rand(1, f, h, w)]
    sched = _check(mod, inputs, lambda x, k, s, b, r: np.maximum(_conv_ref64(x, k, 1, 0) * s + b + r, 0),
                   "conv2d", rtol=1e-4, atol=1e-3)
    assert _is_k_blocked(sched)


def test_k_chunk_choice():
    # the chunk keeps the kernel window whole and divides the channel axis; None when not worth it
    params = cpu_params(HOST)
    nr = params.nr()
    steps = params.kblock_chunk_bytes // (nr * 4)
    c_, y, x, ry, rx = (tirx.Var(n, "int64") for n in ("c", "y", "x", "ry", "rx"))

    def contraction(channels, rows, window):
        return Contraction(block=None, out_buffer=None, v_var=None, r_var=x, batch_s=[y],
                           red_vars=[c_, ry, rx], extents={c_: channels, y: rows, x: rows, ry: window, rx: window})

    var, chunk = _k_chunk(contraction(512, 7, 1), params, nr, 7, 16)
    assert var.same_as(c_) and 512 % chunk == 0 and steps // 2 < chunk <= steps
    var, chunk = _k_chunk(contraction(512, 7, 3), params, nr, 7, 16)
    assert 512 % chunk == 0 and chunk * 9 <= steps < 2 * chunk * 9
    assert _k_chunk(contraction(512, 7, 1), params, nr, 7, params.min_parallel_tasks - 1) is None  # few panels
    assert _k_chunk(contraction(512, 56, 1), params, nr, 8, 16) is None  # accumulator larger than L1
    assert _k_chunk(contraction(steps, 7, 1), params, nr, 7, 16) is None  # one chunk


@pytest.mark.cross
def test_conv2d_k_blocked_neon_under_qemu(neon_runs, tmp_path):
    # 128-bit vectors: 8-wide panels, chunks of 512 steps; 1040 channels -> 4 chunks of 260, 17 panels
    from tests.test_schedules import _scheduled, run_on_neon

    neon = get_target("arm-neon")
    c, h, w, f = 1040, 5, 6, 136
    mod = _module([("x", (1, c, h, w)), ("k", (f, c, 1, 1)), ("b", (1, f, 1, 1))],
                  lambda bb, x, k, b: R.nn.relu(bb.emit(R.add(bb.emit(R.nn.conv2d(x, k)), b))))
    assert _is_k_blocked(_scheduled(mod, neon))
    arrays = [_rand(1, c, h, w), _rand(f, c, 1, 1), _rand(1, f, 1, 1)]
    got = run_on_neon(mod, arrays, tmp_path)
    want = np.maximum(_conv_ref64(*[a.astype(np.float64) for a in arrays[:2]], 1, 0) + arrays[2], 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
