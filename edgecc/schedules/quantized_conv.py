"""Kernel for quantized convolutions (`edgecc.quantized_conv2d`): one direct NCHW conv reading the packed weight.

The weight stays in the storage of the scheme (the [K = C*kh*kw, N = O] right operand of the conv's im2col
matmul, tile-major, `QuantScheme.stored_shapes`). The kernel is an implicit GEMM, like the float conv
(`edgecc.schedules.conv2d`): no materialised im2col, no transpose, the output written in NCHW directly.

    pad[b, c, y, x]       = x zero-padded                                   (own stage: parallel, vectorized)
    wf[o, c, ry, rx]      = scale[g, o] * (code[k, o] - zero[g, o])         k = (c*kh + ry)*kw + rx, g = k // G
    conv[b, o, y, x]      = sum_{c, ry, rx} pad[b, c, y*s + ry*d, x*s + rx*d] * wf[o, c, ry, rx]

and is scheduled with the register-tile template of `contraction.py` (output channel = vector axis, output
column = broadcast row axis). The template packs the weight operand into [o // nr, c, ry, rx, nr] panels per
call (the float conv does the same, its OIHW weight is not contiguous along o); here the decode is inlined
into that pack, so each code is read and decoded once per call, and the micro-kernel is the float conv's.
Per call the kernel reads the packed bytes instead of the fp32 weight (4x / 8x fewer bytes for w8 / w4).

w8a8 (and 4-bit a8 schemes): a separate kernel (`act_quant_primfunc`) first puts the input on an int8 grid
with one dynamic scale per image (max|x| / 127 per batch element, as onnxruntime's dynamic ConvInteger does); the conv then runs
in fp32 on that grid (`round(x / sx) * sx` times `code * scale`: each product is the int8 x int8 product
times both scales, exactly; the sums are fp32). A per-pixel ("per row" of the im2col) scale, as the matmul
kernels use, would give every overlapping window its own grid and could not be applied before the conv.

Output channels that no vector tile divides (17) take a simple parallel schedule (`_schedule_simple`).

1x1 stride-1 convs whose H*W is a multiple of the vector (`use_matmul_form`) are not this kernel: they are
the matmul `y[n] (O x HW) = W (O x C) @ x[n] (C x HW)`, legalized as a decode kernel
(`weight_decode_primfunc`, [O, C] float per call) + a Relax matmul that the default Matmul rule schedules
with the pixels as the vector axis: contiguous loads and stores instead of the direct kernel's transposed
write-back (ResNet-50's 56x56 / 28x28 1x1 layers: ~1.2-2x faster in isolation).
"""

from __future__ import annotations

import logging
import platform

import tvm
from tvm import s_tir, te, tirx

from edgecc.compress.schemes import QuantScheme
from edgecc.schedules.te_conv import conv_out_hw, zero_padded
from edgecc.schedules.te_conv import i64 as _i64

log = logging.getLogger(__name__)

SCHEDULE_NAME = "quantized_conv2d"


def _weight_decoder(k: int, o: int, scheme: QuantScheme):
    """(placeholders qweight, scales[, zeros]; value(kk, col)): element (kk, col) of the [K, O] weight,
    `scale * (code - zero)`, decoded from the packed storage of `scheme` (`QuantScheme.stored_shapes`)."""
    shapes = scheme.stored_shapes(k, o)
    tile = shapes["scales"][0][2]
    g_size = scheme.group_for(k)
    bits = scheme.bits
    wq = te.placeholder([_i64(d) for d in shapes["weight"][0]], shapes["weight"][1], name="qweight")
    s = te.placeholder([_i64(d) for d in shapes["scales"][0]], shapes["scales"][1], name="scales")
    z = te.placeholder([_i64(d) for d in shapes["zeros"][0]], "uint8", name="zeros") if "zeros" in shapes else None
    last_word = shapes["weight"][0][1] - 1
    mask = tirx.const((1 << bits) - 1, "uint32")

    def at(buf, row, col):
        return buf[col // tile, row, col % tile]

    def code(kk, col):
        if scheme.act_bits == 8 and bits == 8:  # w8a8: the int8_dot.pack_k4 layout (4-bit a8: plain words)
            return wq[col // tile, kk // 4, (col % tile) * 4 + kk % 4].astype("float32")
        if bits == 8:
            return at(wq, kk, col).astype("float32")
        pos = kk * bits
        word, shift = pos // 32, (pos % 32).astype("uint32")
        val = at(wq, word, col) >> shift
        if 32 % bits:  # a code may straddle two words
            nxt = at(wq, tirx.min(word + 1, last_word), col) << (tirx.const(32, "uint32") - shift)
            val = tirx.if_then_else(pos % 32 + bits > 32, val | nxt, val)
        return (val & mask).astype("float32")

    def value(kk, col):
        g = kk // g_size
        val = code(kk, col)
        if z is not None:
            val = val - at(z, g, col).astype("float32")
        elif scheme.zero_offset:
            val = val - tirx.const(float(scheme.zero_offset), "float32")
        return at(s, g, col).astype("float32") * val

    return [wq, s] + ([z] if z is not None else []), value


def quantized_conv2d_compute(n: int, c: int, h: int, w: int, o: int, attrs: dict, scheme: QuantScheme,
                             dtype: str = "float32"):
    """TE tensors (args list: x, qweight, scales[, zeros], y) of the direct quantized conv (module docstring)."""
    (sh, sw), (dh, dw), (kh, kw) = attrs["strides"], attrs["dilation"], attrs["kernel"]
    pt, pl, pb, pr = attrs["padding"]
    oh, ow = conv_out_hw(h, w, attrs)
    x = te.placeholder((_i64(n), _i64(c), _i64(h), _i64(w)), dtype, name="x")
    packed, value = _weight_decoder(c * kh * kw, o, scheme)
    inputs = [x] + packed

    def weight(oc, ci, ry, rx):
        return value((ci * kh + ry) * kw + rx, oc)

    wf = te.compute((_i64(o), _i64(c), _i64(kh), _i64(kw)), weight, name="wdecode")

    src = zero_padded(x, attrs["padding"], "pad")

    rc = te.reduce_axis((0, _i64(c)), name="rc")
    ry = te.reduce_axis((0, _i64(kh)), name="ry")
    rx = te.reduce_axis((0, _i64(kw)), name="rx")
    y = te.compute(
        (_i64(n), _i64(o), _i64(oh), _i64(ow)),
        lambda b, oc, yy, xx: te.sum(src[b, rc, yy * sh + ry * dh, xx * sw + rx * dw].astype("float32")
                                     * wf[oc, rc, ry, rx], axis=[rc, ry, rx]),
        name="conv")
    if dtype != "float32":
        y = te.compute(y.shape, lambda *i: y(*i).astype(dtype), name="conv_cast")
    return inputs + [y]


# ------------------------------------------------------------------------------------------ schedule


def _is_cpu(target: tvm.target.Target | None) -> bool:
    return target is None or target.kind.name in ("llvm", "c")


def _params_for(target: tvm.target.Target | None):
    """CpuParams (`edgecc.schedules.params`) for an LLVM target: legalization sees only the tvm Target."""
    from edgecc.schedules.params import cpu_params
    from edgecc.targets.registry import TargetSpec

    bits, cores, arch, features = 128, 1, platform.machine(), ()
    if target is not None:
        try:
            bits = int(tvm.target.codegen.llvm_get_vector_width(target))
        except Exception:  # noqa: BLE001 - unknown CPU: 128-bit vectors
            bits = 128
        attrs = target.attrs
        cores = int(attrs["num-cores"]) if "num-cores" in attrs else 1
        triple = str(attrs["mtriple"]) if "mtriple" in attrs else ""
        arch = next((a for a in ("aarch64", "riscv64", "x86_64") if triple.startswith(a)), arch)
        if arch == "x86_64" and bits >= 512:
            features = ("avx512f",)
    spec = TargetSpec(name="legalize", description="", arch=arch, tvm_target={}, features=features,
                      vector_bits=max(bits, 32), num_cores=max(cores, 1))
    return cpu_params(spec)


def schedule_quantized_conv(func: tirx.PrimFunc, target: tvm.target.Target | None) -> tirx.PrimFunc:
    """The float conv's register-tile schedule (`contraction.schedule`); the weight decode is a producer of the
    weight operand, so the template's per-call pack inlines it (one decode per code and call)."""
    from edgecc.schedules import contraction

    params = _params_for(target)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    block = sch.get_sblock("conv")
    c = contraction.analyze(sch, block, params.lanes())
    if c is None or c.v_var is None or c.r_var is None:
        raise ValueError("the conv block is not a contraction the register-tile template takes")
    contraction.schedule(sch, c, params, fuse_epilogue=False)
    return sch.mod["main"]


def act_quant_primfunc(n: int, length: int, target: tvm.target.Target | None = None,
                       dtype: str = "float32") -> tirx.PrimFunc:
    """w8a8's input stage on the flattened input [N, C*H*W]: x -> clamp(round(x / sx), +-127) * sx with
    sx = max|x| / 127 per image.

    Its own kernel (not a stage of the conv): inlined into the conv it would re-quantize every broadcast
    of the micro-kernel. The max is split into (core, lane) partial maxima (each core streams its
    contiguous share one vector wide), the quantization is parallel and vectorized."""
    params = _params_for(target)
    x = te.placeholder((_i64(n), _i64(length)), dtype, name="x")
    r = te.reduce_axis((0, _i64(length)), name="r")
    amax = te.compute((_i64(n),), lambda b: te.max(tirx.abs(x[b, r].astype("float32")), axis=r), name="amax")
    sx = te.compute((_i64(n),), lambda b: tirx.Select(amax[b] > 0, amax[b] / 127.0, tirx.const(1.0, "float32")),
                    name="sx")
    xq = te.compute(x.shape, lambda b, i: (tirx.max(tirx.min(tirx.round(x[b, i].astype("float32") / sx[b]), 127.0),
                                                    -127.0) * sx[b]).astype(dtype), name="xq")
    func = te.create_prim_func([x, xq]).without_attr("global_symbol")
    if not _is_cpu(target):
        return func
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        cores, lanes = max(1, params.num_cores), params.lanes()
        if length % (cores * lanes) == 0:
            blk = sch.get_sblock("amax")
            _, lr = sch.get_loops(blk)
            part, rest, lane = sch.split(lr, [cores, None, lanes])
            sch.reorder(part, lane, rest)
            rf = sch.rfactor(sch.fuse(part, lane), 0)
            _, q, rr = sch.get_loops(rf)
            qp, ql = sch.split(q, [cores, lanes])
            sch.reorder(qp, rr, ql)
            sch.parallel(qp)
            sch.vectorize(ql)
        sch.compute_inline(sch.get_sblock("sx"))
        lb, li = sch.get_loops(sch.get_sblock("xq"))
        if length % lanes == 0:
            lo, lv = sch.split(li, [None, lanes])
            sch.parallel(sch.fuse(lb, lo))
            sch.vectorize(lv)
        else:
            sch.parallel(lb)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    except Exception as exc:  # noqa: BLE001 - a schedule bug costs speed, not the build
        log.warning("activation quantization schedule failed for %sx%s: %s", n, length,
                    str(exc).strip().splitlines()[-1][:200])
        return func


def use_matmul_form(attrs: dict, pixels: int, target: tvm.target.Target | None) -> bool:
    """Whether a conv is the matmul `y[n] (O x P) = W (O x C) @ x[n] (C x P)` (1x1, stride 1, no padding)
    with P = H*W a multiple of the vector: then the pixels are the vector axis (contiguous loads of x and
    stores of y, no transposed write-back) and the conv is an ordinary Relax matmul that the default Matmul
    rule schedules (56x56 and 28x28 ResNet layers). Its epilogue (BatchNorm, ReLU, residual) stays a separate
    elementwise kernel, as after the direct kernel: the reshape back to NCHW sits between them and FuseOps
    fuses no injective op after a matmul."""
    if not _is_cpu(target):
        return False
    one = attrs["kernel"] == [1, 1] and attrs["strides"] == [1, 1] and not any(attrs["padding"])
    return one and pixels % _params_for(target).lanes() == 0


def weight_decode_primfunc(k: int, o: int, scheme: QuantScheme, target: tvm.target.Target | None = None,
                           ) -> tirx.PrimFunc:
    """The float weight [O, K] (the left operand of the matmul form) decoded from its packed storage: each
    code read and decoded once per call (O*K*4 bytes written; the 1x1 layers it serves are small)."""
    packed, value = _weight_decoder(k, o, scheme)
    wf = te.compute((_i64(o), _i64(k)), lambda oc, kk: value(kk, oc), name="wdecode")
    func = te.create_prim_func(packed + [wf]).without_attr("global_symbol")
    if not _is_cpu(target):
        return func
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        lo, _ = sch.get_loops(sch.get_sblock("wdecode"))
        sch.parallel(lo)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    except Exception as exc:  # noqa: BLE001 - a schedule bug costs speed, not the build
        log.warning("weight decode schedule failed for %sx%s %s: %s", k, o, scheme.name,
                    str(exc).strip().splitlines()[-1][:200])
        return func


def quantized_conv2d_primfunc(n: int, c: int, h: int, w: int, o: int, attrs: dict, scheme: QuantScheme,
                              target: tvm.target.Target | None = None, dtype: str = "float32",
                              schedule: bool = True) -> tuple[tirx.PrimFunc, bool]:
    """The kernel as a PrimFunc (scheduled for `target` when the template takes it) and whether it is."""
    func = te.create_prim_func(quantized_conv2d_compute(n, c, h, w, o, attrs, scheme, dtype))
    func = func.without_attr("global_symbol")
    if not schedule or not _is_cpu(target):  # GPU targets: left to their default schedules
        return func, False
    try:
        return schedule_quantized_conv(func, target), True
    except Exception as exc:  # noqa: BLE001 - a schedule bug costs speed, not the build
        log.info("quantized conv register-tile schedule not applied for %sx%sx%sx%s -> %s %s: %s", n, c, h, w, o,
                 scheme.name, str(exc).strip().splitlines()[-1][:200])
    try:
        return _schedule_simple(func), True
    except Exception as exc:  # noqa: BLE001
        log.warning("quantized conv schedule failed for %sx%sx%sx%s -> %s %s: %s", n, c, h, w, o, scheme.name,
                    str(exc).strip().splitlines()[-1][:200])
        return func, False


def _schedule_simple(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Fallback (an output-channel count no vector tile divides): decode the weight once, batch x channel
    rows of the output in parallel."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for name in ("wdecode", "pad"):
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - stage absent for this conv
            continue
        loops = sch.get_loops(blk)
        sch.parallel(sch.fuse(*loops[:2]))
    conv = sch.get_sblock("conv")
    loops = sch.get_loops(conv)
    sch.parallel(sch.fuse(*loops[:2]))
    return sch.mod["main"]
