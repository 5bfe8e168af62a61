"""NCHW convolutions store their epilogue once per output row of a panel (`contraction._row_epilogue`), not
once per register tile. IR before -> after (`EDGECC_ROW_EPILOGUE=0` gives the per-tile nest): the block that
writes the output runs outside the row-tile loop, over the whole row width, vectorized; numerics of both
against numpy float64 on odd shapes, with a fused scale/shift/residual/ReLU epilogue."""

from __future__ import annotations

import numpy as np
import pytest
from tvm import relax, s_tir, tirx

from edgecc.schedules import SCHEDULE_ATTR, cpu_params
from tests.test_schedules import HOST, _check, _conv_ref64, _module, _rand

R = relax.op


def _output_store_loops(sched) -> list:
    """The loops around the block of the conv kernel that writes its output parameter (outermost first)."""
    (func,) = [f for _, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)
               and str(f.attrs.get(SCHEDULE_ATTR, "")) == "conv2d"]
    out = func.params[-1]  # TVM 0.27: a buffer parameter is the buffer variable itself
    found = []

    def visit(node, loops):
        if isinstance(node, tirx.For):
            visit(node.body, loops + [node])
        elif isinstance(node, tirx.SeqStmt):
            for stmt in node.seq:
                visit(stmt, loops)
        elif isinstance(node, s_tir.SBlockRealize):
            if any(w.source.same_as(out) for w in node.block.writes):
                found.append(loops)
            visit(node.block.body, loops)
        elif hasattr(node, "body"):
            visit(node.body, loops)

    visit(func.body, [])
    assert found, "no block writes the conv's output"
    return found[0]


def _conv_bn_relu(c, h, w, f, kh, stride, pad):
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kh) // stride + 1
    mod = _module([("x", (1, c, h, w)), ("k", (f, c, kh, kh)), ("s", (1, f, 1, 1)), ("b", (1, f, 1, 1)),
                   ("r", (1, f, oh, ow))],
                  lambda bb, x, k, s, b, r: R.nn.relu(bb.emit(R.add(bb.emit(R.add(bb.emit(R.multiply(
                      bb.emit(R.nn.conv2d(x, k, strides=stride, padding=pad)), s)), b)), r))))
    inputs = [_rand(1, c, h, w), _rand(f, c, kh, kh), _rand(1, f, 1, 1), _rand(1, f, 1, 1), _rand(1, f, oh, ow)]

    def ref(x, k, s, b, r):
        return np.maximum(_conv_ref64(x, k, stride, pad) * s + b + r, 0)

    return mod, inputs, ref, ow


@pytest.mark.parametrize("c,h,w,f,kh,stride,pad", [
    (16, 23, 23, 64, 3, 1, 1),  # odd width: row tiles do not divide it
    (3, 29, 31, 32, 7, 2, 3),  # a stem: 7x7 stride 2 on odd sizes
    (24, 12, 56, 32, 3, 1, 1),  # ResNet's 56-wide rows
])
def test_epilogue_runs_per_output_row(c, h, w, f, kh, stride, pad, monkeypatch):
    mod, inputs, ref, ow = _conv_bn_relu(c, h, w, f, kh, stride, pad)
    # before: the store sits in the row-tile loop (its innermost loop spans one tile of columns or channels)
    monkeypatch.setenv("EDGECC_ROW_EPILOGUE", "0")
    per_tile = _output_store_loops(_check(mod, inputs, ref, "conv2d", rtol=1e-4, atol=1e-3))
    assert int(per_tile[-1].extent) < ow
    # after: one store per output row of a panel, the whole width vectorized, one loop level higher
    monkeypatch.delenv("EDGECC_ROW_EPILOGUE")
    per_row = _output_store_loops(_check(mod, inputs, ref, "conv2d", rtol=1e-4, atol=1e-3))
    assert int(per_row[-1].extent) == ow and per_row[-1].kind == tirx.ForKind.VECTORIZED
    assert len([lp for lp in per_row if lp.kind == tirx.ForKind.PARALLEL]) == 1


def test_rows_wider_than_the_accumulator_budget_keep_per_tile_stores():
    # a 300-wide output row x one panel of channels is more than kblock_acc_bytes: left per tile
    params = cpu_params(HOST)
    c, h, w, f = 4, 3, 300, 64
    assert w * params.nr() * 4 > params.kblock_acc_bytes
    mod, inputs, ref, ow = _conv_bn_relu(c, h, w, f, 3, 1, 1)
    loops = _output_store_loops(_check(mod, inputs, ref, "conv2d", rtol=1e-4, atol=1e-3))
    assert int(loops[-1].extent) < ow
