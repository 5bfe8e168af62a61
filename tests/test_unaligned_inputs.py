"""unaligned_inputs: kernels reading a model input declare it element-aligned (IR before -> after), run on
numpy's misaligned buffers without a copy (numbers vs numpy float64), and only inputs are affected."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402

from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, lower_passes, schedule_passes  # noqa: E402
from edgecc.ir_passes.unaligned_inputs import (INPUTS_ANY_ALIGNMENT, inputs_any_alignment,  # noqa: E402
                                               unaligned_inputs_pass)
from edgecc.targets.registry import get_target  # noqa: E402

HOST = get_target("host")


def _module(reshape_input: bool = False, packed_use: bool = False, match_cast: bool = False):
    """main(x, w): relu(x) @ w + x[:, :1] (x as [6, 64], or as [2, 3, 64] reshaped first): the relu kernel
    reads x with vector loads; optionally x also goes to a packed function (a vendor call the pass cannot
    see into)."""
    bb = relax.BlockBuilder()
    if match_cast:  # x of unknown shape, restated by a match_cast (as dynamic-shape imports emit)
        x = relax.Var("x", relax.TensorType(None, "float32", ndim=2))
    else:
        x = relax.Var("x", relax.TensorType([2, 3, 64] if reshape_input else [6, 64], "float32"))
    w = relax.Var("w", relax.TensorType([64, 37], "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            x2 = bb.emit(relax.op.reshape(x, [6, 64])) if reshape_input else x
            if match_cast:
                x2 = bb.match_cast(x2, relax.TensorType([6, 64], "float32"))
            h = bb.emit(relax.op.matmul(relax.op.nn.relu(x2), w))
            y = bb.emit(relax.op.add(h, relax.op.strided_slice(x2, axes=[1], begin=[0], end=[1])))
            if packed_use:
                ext = bb.emit(relax.call_dps_packed("vendor.copy", [x], relax.TensorType([6, 64], "float32")))
                y = bb.emit(relax.op.add(y, relax.op.sum(ext)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _scheduled(mod):
    with HOST.tvm():
        return tvm.transform.Sequential(legalize_and_fuse_passes() + schedule_passes(HOST))(mod)


def _kernel_calls(func):
    """[(kernel name, [arg vars])] of the call_tir bindings of a Relax function."""
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            calls.append((e.args[0].name_hint, list(e.args[1].fields)))

    relax.analysis.post_order_visit(func.body, visit)
    return calls


def _alignments(mod, name):
    return [p.data_alignment for p in mod[name].params if tvm.tirx.buffer.is_buffer_var(p)]


@pytest.mark.parametrize("reshape_input,match_cast", [(False, False), (True, False), (False, True)])
def test_input_params_become_element_aligned(reshape_input, match_cast):
    before = _scheduled(_module(reshape_input, match_cast=match_cast))
    main = before["main"]
    x_vars = {main.params[0]}
    for block in main.body.blocks:  # x, its reshaped view, its match_cast alias
        for b in block.bindings:
            value = b.value
            if (isinstance(b, relax.MatchCast) and value in x_vars) or (
                    isinstance(value, relax.Call) and value.op.name == "relax.reshape" and value.args[0] in x_vars):
                x_vars.add(b.var)
    calls = _kernel_calls(main)
    readers = {k: [i for i, a in enumerate(args) if a in x_vars] for k, args in calls}
    assert len([k for k, pos in readers.items() if pos]) >= 2  # the relu kernel and the slice/add one
    after = unaligned_inputs_pass(before)
    for kernel, positions in readers.items():
        was, now = _alignments(before, kernel), _alignments(after, kernel)
        assert all(a == 64 for a in was)  # TVM's default for every buffer
        # x (directly, or through its reshape view or match_cast alias) -> 4 bytes; the rest keeps 64
        assert now == [4 if i in positions else 64 for i in range(len(was))]
    assert inputs_any_alignment(after) and not inputs_any_alignment(before)
    # numbers: the kernels take a misaligned numpy buffer as it is, zero-copy
    rng = np.random.default_rng(0)
    shape = (2, 3, 64) if reshape_input else (6, 64)
    raw = np.empty(384 * 4 + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + 4  # 4 bytes past a 64-byte boundary
    x = raw[start:start + 384 * 4].view(np.float32).reshape(shape)
    x[...] = rng.standard_normal(shape)
    assert x.ctypes.data % 64 == 4
    w = rng.standard_normal((64, 37)).astype("float32")
    with HOST.tvm():
        ex = relax.build(tvm.transform.Sequential(lower_passes())(after), HOST.tvm(), relax_pipeline=None)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm_ffi.from_dlpack(x), tvm.runtime.tensor(w)).numpy()
    x64 = x.reshape(6, 64).astype(np.float64)
    ref = np.maximum(x64, 0) @ w + x64[:, :1]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_an_input_a_vendor_call_reads_keeps_the_artifact_aligned():
    """x also goes to a packed function: its kernels still take x unaligned, but the function is not marked,
    so the runtime keeps copying x into a 64-byte aligned tensor (the vendor library may assume that)."""
    after = unaligned_inputs_pass(_scheduled(_module(packed_use=True)))
    assert INPUTS_ANY_ALIGNMENT in after["main"].attrs and not inputs_any_alignment(after)
    assert any(4 in _alignments(after, k) for k, _ in _kernel_calls(after["main"]))


def test_module_without_inputs_attr_is_unchanged():
    mod = _scheduled(_module())
    main = mod["main"].without_attr("num_input")
    plain = tvm.IRModule(dict(mod.functions_items()))
    plain["main"] = main
    assert unaligned_inputs_pass(plain).same_as(plain)
