"""The grouped/depthwise conv rule (edgecc.schedules.depthwise): it takes the kernel, and the numbers are right.

Shapes are odd on purpose (3 or 17 channels, 1x1 / 7x7 / 13x13 images, stride 2, 5x5 windows, groups = C and
groups = 3, channel multipliers), in NCHW and NHWC, with the fused epilogues MobileNet and ShuffleNet have
(bias + ReLU6 clip, bias + ReLU). Reference: a direct numpy float64 grouped convolution. Two cases are also
built for arm-neon and run under qemu (128-bit vectors: other widths and row tiles).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, relax_pipeline  # noqa: E402
from edgecc.schedules import SCHEDULE_ATTR, cpu_params, cpu_schedule_passes, schedule_report  # noqa: E402
from edgecc.schedules.depthwise import choose_vector_width  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402

R = relax.op
HOST = get_target("host")
NEON = get_target("arm-neon")


def _module(inputs, body):
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in inputs]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _ref_conv_nchw(x, w, stride, pad, groups):
    """Grouped conv, NCHW / OIHW, float64, written out per group and window tap."""
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    fg = f // groups
    out = np.zeros((n, f, oh, ow))
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * fg:(g + 1) * fg]
        for i in range(kh):
            for j in range(kw):
                win = xs[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                out[:, g * fg:(g + 1) * fg] += np.einsum("nchw,fc->nfhw", win, ws[:, :, i, j])
    return out


def _ref_conv_nhwc(x, w, stride, pad, groups):
    """NHWC input, HWIO weight: the NCHW reference on transposed operands."""
    out = _ref_conv_nchw(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), stride, pad, groups)
    return out.transpose(0, 2, 3, 1)


# name: (layout, N, C, H, W, F, k, stride, pad, groups, epilogue)
CASES = {
    "dw3x3_c3_7x7_relu6": ("NCHW", 1, 3, 7, 7, 3, 3, 1, 1, 3, "bias_relu6"),
    "dw3x3_c17_13x13_s2_relu6": ("NCHW", 1, 17, 13, 13, 17, 3, 2, 1, 17, "bias_relu6"),
    "dw3x3_c17_1x1": ("NCHW", 1, 17, 1, 1, 17, 3, 1, 1, 17, "none"),
    "dw5x5_c17_13x7_s2": ("NCHW", 2, 17, 13, 7, 17, 5, 2, 2, 17, "bias_relu"),
    "dw3x3_multiplier2_c3_13x13": ("NCHW", 1, 3, 13, 13, 6, 3, 1, 1, 3, "bias_relu"),
    "gconv1x1_g3_c12_f9_7x13": ("NCHW", 1, 12, 7, 13, 9, 1, 1, 0, 3, "bias_relu"),
    "gconv1x1_g3_c24_f48_7x7": ("NCHW", 1, 24, 7, 7, 48, 1, 1, 0, 3, "none"),
    # 10 / 11 channels per group: a row tile of channels must divide it (a partial one spilled into the next
    # group); 11 takes output rows instead
    "gconv1x1_g3_c6_f30_7x7": ("NCHW", 1, 6, 7, 7, 30, 1, 1, 0, 3, "bias_relu"),
    "gconv1x1_g3_c6_f33_7x7": ("NCHW", 1, 6, 7, 7, 33, 1, 1, 0, 3, "bias_relu"),
    "gconv3x3_g3_c9_f6_13x7_s2": ("NCHW", 1, 9, 13, 7, 6, 3, 2, 1, 3, "bias_relu6"),
    "nhwc_dw3x3_c17_7x7_relu": ("NHWC", 1, 17, 7, 7, 17, 3, 1, 1, 17, "bias_relu"),
    "nhwc_dw3x3_c3_13x13_s2": ("NHWC", 1, 3, 13, 13, 3, 3, 2, 1, 3, "none"),
    "nhwc_gconv3x3_g3_c9_f12_7x7": ("NHWC", 1, 9, 7, 7, 12, 3, 1, 1, 3, "bias_relu6"),
}


def _case(name):
    layout, n, c, h, w, f, k, stride, pad, groups, epi = CASES[name]
    if layout == "NCHW":
        x_shape, w_shape, b_shape = (n, c, h, w), (f, c // groups, k, k), (1, f, 1, 1)
        conv_kw = {}
        ref_conv = _ref_conv_nchw
        b_ref_shape = (1, f, 1, 1)
    else:
        x_shape, w_shape, b_shape = (n, h, w, c), (k, k, c // groups, f), (f,)
        conv_kw = {"data_layout": "NHWC", "kernel_layout": "HWIO"}
        ref_conv = _ref_conv_nhwc
        b_ref_shape = (f,)
    inputs = [("x", x_shape), ("w", w_shape)] + ([("b", b_shape)] if epi != "none" else [])

    def body(bb, x, wt, b=None):
        y = bb.emit(R.nn.conv2d(x, wt, strides=stride, padding=pad, groups=groups, **conv_kw))
        if epi == "none":
            return y
        y = bb.emit(R.add(y, b))
        return R.clip(y, 0, 6) if epi == "bias_relu6" else R.nn.relu(y)

    def ref(x, wt, b=None):
        y = ref_conv(x, wt, stride, pad, groups)
        if epi == "none":
            return y
        y = y + b.reshape(b_ref_shape)
        return np.clip(y, 0, 6) if epi == "bias_relu6" else np.maximum(y, 0)

    return _module(inputs, body), inputs, ref


def _arrays(inputs, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for _, shape in inputs]


def _scheduled(mod, spec):
    with spec.tvm():
        return tvm.transform.Sequential(legalize_and_fuse_passes() + cpu_schedule_passes(spec))(mod)


def _conv_func(sched):
    funcs = [(gv.name_hint, f) for gv, f in sched.functions_items() if isinstance(f, tirx.PrimFunc)]
    convs = [(n, f) for n, f in funcs if "conv" in n]
    assert len(convs) == 1, [n for n, _ in funcs]
    return convs[0][1]


def _parallel_loops_with_pad(func):
    """(kinds of all loops, whether a pad block sits under a parallel loop)."""
    kinds, pad_in_parallel = set(), []

    def visit_for(loop):
        kinds.add(int(loop.kind))
        if int(loop.kind) == int(tirx.ForKind.PARALLEL):
            names = []
            tvm_ffi.structural_walk(loop.body, (tvm.s_tir.SBlock, lambda b: names.append(b.name_hint)), order="pre")
            pad_in_parallel.append(any(n.startswith("pad_temp") for n in names))

    tvm_ffi.structural_walk(func.body, (tirx.For, visit_for), order="pre")
    return kinds, any(pad_in_parallel)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grouped_conv_host(name):
    mod, inputs, ref = _case(name)
    sched = _scheduled(mod, HOST)
    func = _conv_func(sched)
    assert str(func.attrs[SCHEDULE_ATTR]) == "grouped_conv", schedule_report(sched)
    kinds, pad_in_parallel = _parallel_loops_with_pad(func)
    assert int(tirx.ForKind.VECTORIZED) in kinds or CASES[name][4] == 1  # a 1-wide output has no vector axis
    if CASES[name][8] > 0 and int(tirx.ForKind.PARALLEL) in kinds:
        assert pad_in_parallel, "the padded input should be computed per parallel task, not for the whole tensor"

    ex = tvm.compile(mod, target=HOST.tvm(), relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    arrays = _arrays(inputs, len(name))
    got = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    want = ref(*[a.astype(np.float64) for a in arrays])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_channel_rows_never_straddle_groups():
    """11 channels per group (prime): no row tile of channels divides it, so none is used. (With a partial
    tile of 8, the epilogue's region, computed over the group split, covered channels of the next group:
    parallel tasks then wrote each other's outputs, a race the numerics alone do not always show.)"""
    mod, _, _ = _case("gconv1x1_g3_c6_f33_7x7")
    func = _conv_func(_scheduled(mod, HOST))
    predicates = []

    def visit(realize):
        if not (isinstance(realize.predicate, tirx.IntImm) and int(realize.predicate) == 1):
            predicates.append(realize.block.name_hint)

    tvm_ffi.structural_walk(func.body, (tvm.s_tir.SBlockRealize, visit), order="pre")
    assert not predicates, predicates


def test_dense_conv_is_not_taken():
    """groups=1: the implicit-GEMM conv2d rule keeps it (the channel does not reach the input)."""
    mod = _module([("x", (1, 8, 9, 9)), ("w", (16, 8, 3, 3))], lambda bb, x, w: R.nn.conv2d(x, w, padding=1))
    report = schedule_report(_scheduled(mod, HOST))
    assert "grouped_conv" not in report.values(), report


def test_vector_width_uses_whole_short_rows():
    # 16 lanes (AVX-512): a row of 7 or 14 is one vector, 112 takes full vectors, primes stay whole
    assert choose_vector_width(7, 16, 64) == 7
    assert choose_vector_width(112, 16, 64) == 16
    assert choose_vector_width(56, 16, 64) == 56
    assert choose_vector_width(13, 4, 16) == 13
    assert choose_vector_width(1, 16, 64) == 1
    # x86: wider than a register only in powers of two (28 -> 14, 56 -> 14, 64 stays)
    assert choose_vector_width(28, 16, 64, pow2_wide=True) == 14
    assert choose_vector_width(56, 16, 64, pow2_wide=True) == 14
    assert choose_vector_width(64, 16, 64, pow2_wide=True) == 64
    # 4 lanes (NEON): full registers first (56 -> 8, 28 -> 4), a short row stays whole (7 -> 7)
    assert choose_vector_width(56, 4, 16) == 8
    assert choose_vector_width(28, 4, 16) == 4
    assert choose_vector_width(7, 4, 16) == 7


def _register_tiles(func):
    """(rows, vector width) of every unrolled-rows x vectorized micro-kernel loop pair of a conv update."""
    tiles = []

    def visit_for(loop):
        inner = loop.body
        if int(loop.kind) == int(tirx.ForKind.UNROLLED) and isinstance(inner, tirx.For) \
                and int(inner.kind) == int(tirx.ForKind.VECTORIZED):
            names = []
            tvm_ffi.structural_walk(inner.body, (tvm.s_tir.SBlock, lambda b: names.append(b.name_hint)),
                                    order="pre")
            if any("conv" in n and "update" in n for n in names):
                tiles.append((int(loop.extent), int(inner.extent)))

    tvm_ffi.structural_walk(func.body, (tirx.For, visit_for), order="pre")
    return tiles


@pytest.mark.parametrize("name", ["dw3x3_c17_13x13_s2_relu6", "gconv1x1_g3_c24_f48_7x7", "nhwc_dw3x3_c17_7x7_relu"])
def test_register_tile_fits_half_the_register_file(name):
    for spec in (HOST, NEON):
        params = cpu_params(spec)
        mod, _, _ = _case(name)
        tiles = _register_tiles(_conv_func(_scheduled(mod, spec)))
        assert tiles, f"no rows x vector micro-kernel on {spec.name}"
        for rows, width in tiles:
            assert rows > 1
            assert rows * -(-width // params.lanes()) <= params.vector_regs // 2, (spec.name, rows, width)


CROSS = ["dw3x3_c17_13x13_s2_relu6", "gconv1x1_g3_c12_f9_7x13"]


@pytest.mark.cross
@pytest.mark.parametrize("name", CROSS)
def test_grouped_conv_neon_under_qemu(name, neon_runs, tmp_path):
    from tests.test_schedules import run_on_neon

    mod, inputs, ref = _case(name)
    assert "grouped_conv" in schedule_report(_scheduled(mod, NEON)).values()
    arrays = _arrays(inputs, len(name))
    got = run_on_neon(mod, arrays, tmp_path)
    want = ref(*[a.astype(np.float64) for a in arrays])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
