"""Repack convolution weights at build time into the panels the conv kernel reads.

    y = R.nn.conv2d(x, W)     W: [co, ci, kh, kw]    ─▶    y = R.call_tir(conv2d_panels, (x, Wp))
                                                           Wp: [co / nr, ci, kh, kw, nr]

Why: the conv kernel (`schedules/conv2d.py`, the register-tile template of `schedules/contraction.py`)
vectorizes over output channels, so it needs `nr` adjacent output channels of the weight contiguous. OIHW
is contiguous along the reduction instead, and the template used to pack every weight into
`[co / nr, ci, kh, kw, nr]` panels on every call: all of a CNN's weights read, rewritten and read again per
inference (ResNet-50: ~100 MB). Here the panels are cut once, in numpy, and the kernel streams them.

The replacement is a PrimFunc written in TE with the same two stages `LegalizeOps` gives a conv2d (a
zero-padded copy of the input, then `conv[n, f, y, x] += pad[n, c, y*s + ry*d, x*s + rx*d] *
Wp[f // nr, c, ry, rx, f % nr]`), so FuseOps still fuses the epilogue (bias, BatchNorm's scale and shift,
residual add, ReLU) into it and the contraction analysis recognises the panel layout (`prepacked_nr`).
`nr` is the tile width the template would choose for `co` on this target (`choose_tile_width`). A `co` no
whole tile of vectors divides (SqueezeNet's 1000-class 1x1 conv) gets zero output channels up to the next
multiple of the full tile, when that adds at most `MAX_CHANNEL_PAD` of the work: the kernel computes the
padded channels and a `strided_slice` keeps the real ones (the epilogue then runs on the slice, a small
elementwise kernel). Without it such a conv ran on half-vector tiles (8 channels of 16 lanes): SqueezeNet's
512 -> 1000 conv took 2.7 ms at 64 GFLOP/s, a third of the model. Smaller `co` (20, 10) keep the run-time path.

What is rewritten, in one function: `R.nn.conv2d` with groups 1, NCHW/OIHW/NCHW layouts, static float
shapes and a weight parameter (after `num_input`) every use of which is such a convolution. Run after
`conv1x1_as_matmul` (which turns the 1x1 convs that run faster as GEMMs into matmuls first).

A strided 1x1 conv without padding (a ResNet projection) first subsamples its input (`strided_slice`, a copy of
the pixels it reads) and then runs as a dense 1x1 conv: strided, each row tile read a few floats from each of
twice as many cache lines, and ResNet-50's 512 -> 1024 stride-2 projection (28x28 -> 14x14) took 1.5x
onnxruntime's time; subsampled first, 0.70x (2 threads) and 0.74x (1 thread) the strided kernel's time, copy included.

`EDGECC_PACK_CONV=0` turns it off (for A/B timing).
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax, te, tirx

from edgecc.ir_passes.rebind import (op_name, replace_bindings, static_dims, swap_weights, var_uses, weight_params,
                                     with_function)
from edgecc.schedules.contraction import choose_tile_width
from edgecc.schedules.params import cpu_params
from edgecc.schedules.te_conv import conv_out_hw, i64, zero_padded
from edgecc.targets.registry import TargetSpec

R = relax.op


#: output channels a conv may be padded by (a share of its work) to run on whole-vector tiles
MAX_CHANNEL_PAD = 0.125


def pack_conv_panels(w: np.ndarray, nr: int, co_padded: int | None = None) -> np.ndarray:
    """[co, ci, kh, kw] -> [co' / nr, ci, kh, kw, nr] (panel p holds output channels p*nr .. p*nr+nr-1), with
    zero channels from co up to `co_padded` (co' = co_padded or co)."""
    co, ci, kh, kw = w.shape
    if co_padded is not None and co_padded > co:
        w = np.concatenate([w, np.zeros((co_padded - co, ci, kh, kw), w.dtype)])
        co = co_padded
    return np.ascontiguousarray(w.reshape(co // nr, nr, ci, kh, kw).transpose(0, 2, 3, 4, 1))


def conv2d_panels_primfunc(xd: list[int], co: int, kh: int, kw: int, nr: int, strides, padding, dilation,
                           dtype: str) -> tirx.PrimFunc:
    """The NCHW conv reading the [co / nr, ci, kh, kw, nr] weight panels (module docstring)."""
    n, ci, h, w = xd
    (sh, sw), (dh, dw) = strides, dilation
    oh, ow = conv_out_hw(h, w, {"strides": strides, "dilation": dilation, "kernel": (kh, kw), "padding": padding})
    x = te.placeholder([i64(d) for d in xd], dtype, name="x")
    wp = te.placeholder([i64(co // nr), i64(ci), i64(kh), i64(kw), i64(nr)], dtype, name="w_panels")
    src = zero_padded(x, padding, "pad_temp")
    rc = te.reduce_axis((0, i64(ci)), name="rc")
    ry = te.reduce_axis((0, i64(kh)), name="ry")
    rx = te.reduce_axis((0, i64(kw)), name="rx")
    y = te.compute(
        (i64(n), i64(co), i64(oh), i64(ow)),
        lambda b, f, yy, xx: te.sum(src[b, rc, yy * sh + ry * dh, xx * sw + rx * dw]
                                    * wp[f // nr, rc, ry, rx, f % nr], axis=[rc, ry, rx]),
        name="conv2d_nchw")
    # a private function: the module's only public symbol stays `main`
    return te.create_prim_func([x, wp, y]).without_attr("global_symbol")


def _conv(call, weights: set):
    """(x dims, W dims, attrs) when `call` is a convolution this pass can rewrite, else None."""
    if op_name(call) != "relax.nn.conv2d":
        return None
    x, w = call.args
    a = call.attrs
    if w not in weights or int(a.groups) != 1:
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    dtype = str(x.ty.dtype)
    if a.out_dtype is not None and str(a.out_dtype) not in ("", "void", dtype):
        return None
    if dtype != str(w.ty.dtype) or not dtype.startswith("float"):
        return None
    xd, wd = static_dims(x.ty), static_dims(w.ty)
    if xd is None or wd is None or len(xd) != 4 or len(wd) != 4 or xd[1] != wd[1]:
        return None
    return xd, wd, a


def pack_conv_weights(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], spec: TargetSpec,
                      func_name: str = "main"):
    """-> (module, named weights, number of weights packed). See the module docstring."""
    func = mod[func_name]
    if spec.device != "cpu" or "num_input" not in (func.attrs or {}):
        return mod, list(named_weights), 0
    params = cpu_params(spec)
    num_input, wvars = weight_params(func, named_weights, func_name)
    weights = set(wvars)
    sites: dict = {}  # weight var -> [(binding, x dims, W dims, attrs)]
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        for b in block.bindings:
            found = _conv(b.value, weights) if isinstance(b, relax.VarBinding) else None
            if found is not None:
                sites.setdefault(b.value.args[1], []).append((b, *found))
    uses = var_uses(func)
    packed: dict = {}  # old weight var -> (new var, panel width)
    for w, convs in sites.items():
        if uses.get(w, 0) != len(convs):
            continue  # also read by something that is not a convolution
        co, ci, kh, kw = convs[0][2]
        bits = tvm.runtime.DataType(str(w.ty.dtype)).bits
        nr, needs_pad = choose_tile_width(co, params.nr(bits), params.lanes(bits))
        co_padded = co
        if needs_pad:
            nr = params.nr(bits)
            co_padded = -(-co // nr) * nr
            if co_padded - co > MAX_CHANNEL_PAD * co:
                continue
        packed[w] = (relax.Var(w.name + "_panels", relax.TensorType([co_padded // nr, ci, kh, kw, nr],
                                                                     str(w.ty.dtype))), nr, co_padded)
    if not packed:
        return mod, list(named_weights), 0

    bb = relax.BlockBuilder(mod)
    replace: dict = {}
    kernels: dict = {}  # conv configuration -> GlobalVar (identical convs share one PrimFunc)
    for w, convs in sites.items():
        if w not in packed:
            continue
        wp, nr, co_padded = packed[w]
        for b, xd, wd, a in convs:
            x = b.value.args[0]
            dtype = str(x.ty.dtype)
            strides = [int(s) for s in a.strides]
            padding = [int(p) for p in a.padding]
            dilation = [int(d) for d in a.dilation]
            kind = relax.DataflowVar if isinstance(b.var, relax.DataflowVar) else relax.Var
            before = []
            if wd[2:] == [1, 1] and strides != [1, 1] and not any(padding):
                # a strided 1x1 conv: subsample the input first (a small copy), then a dense 1x1 conv
                xd = [xd[0], xd[1], -(-xd[2] // strides[0]), -(-xd[3] // strides[1])]
                sub = kind(b.var.name + "_subsampled", relax.TensorType(xd, dtype))
                before = [relax.VarBinding(sub, R.strided_slice(x, axes=[2, 3], begin=[0, 0], end=static_dims(x.ty)[2:],
                                                                strides=strides))]
                x, strides = sub, [1, 1]
            key = (tuple(xd), tuple(wd), nr, co_padded, tuple(strides), tuple(padding), tuple(dilation), dtype)
            if key not in kernels:
                prim = conv2d_panels_primfunc(xd, co_padded, wd[2], wd[3], nr, strides, padding, dilation, dtype)
                kernels[key] = bb.add_func(prim, "conv2d_panels")
            if co_padded == wd[0]:
                call = relax.call_tir(kernels[key], [x, wp], b.var.ty)
                replace[b.var] = before + [relax.VarBinding(b.var, call)]
                continue
            out = static_dims(b.var.ty)
            wide = kind(b.var.name + "_padded", relax.TensorType([out[0], co_padded, *out[2:]], dtype))
            replace[b.var] = before + [
                relax.VarBinding(wide, relax.call_tir(kernels[key], [x, wp], wide.ty)),
                relax.VarBinding(b.var, R.strided_slice(wide, axes=[1], begin=[0], end=[wd[0]]))]
    body = replace_bindings(func, replace)
    new_params, named = swap_weights(func, num_input, named_weights, {v: p[0] for v, p in packed.items()},
                                     lambda v, arr: pack_conv_panels(arr, packed[v][1], packed[v][2]))
    return with_function(bb.get(), func_name, func, new_params, body, bb), named, len(packed)


def pack_conv_for_build(mod: tvm.IRModule, named_weights: list[tuple[str, np.ndarray]], spec: TargetSpec,
                        func_name: str = "main"):
    """The build's hook (after `conv1x1_as_matmul`): `pack_conv_weights` unless EDGECC_PACK_CONV=0."""
    if os.environ.get("EDGECC_PACK_CONV", "1") == "0":
        return mod, list(named_weights)
    mod, named, _ = pack_conv_weights(mod, named_weights, spec, func_name)
    return mod, named
