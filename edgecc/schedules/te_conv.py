"""TE pieces shared by the convolution kernels written in TE (`quantized_conv`, `ir_passes.pack_conv_weights`).

Both build a direct NCHW convolution as `LegalizeOps` would (a zero-padded copy of the input as its own stage,
then the reduction), so the conv schedule (`contraction.py`) treats them like a legalized `conv2d`.
"""

from __future__ import annotations

from tvm import te, tirx


def i64(v: int):
    """An int64 constant: Relax's TIR shapes and loop bounds are int64."""
    return tirx.IntImm("int64", v)


def conv_out_hw(h: int, w: int, attrs: dict) -> tuple[int, int]:
    """Output height and width of a conv: `attrs` has `strides`, `dilation`, `kernel` [kh, kw] and `padding`
    [top, left, bottom, right]."""
    (sh, sw), (dh, dw), (kh, kw) = attrs["strides"], attrs["dilation"], attrs["kernel"]
    pt, pl, pb, pr = attrs["padding"]
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def zero_padded(x: te.Tensor, padding, name: str) -> te.Tensor:
    """`x` [n, c, h, w] with `padding` [top, left, bottom, right] zero rows/columns around it, as a stage of its
    own (`x` itself when there is no padding)."""
    pt, pl, pb, pr = padding
    if not (pt or pl or pb or pr):
        return x
    n, c, h, w = [int(d) for d in x.shape]

    def value(b, ci, yy, xx):
        inside = tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w)
        return tirx.if_then_else(inside, x[b, ci, yy - pt, xx - pl], tirx.const(0, x.dtype))

    return te.compute((i64(n), i64(c), i64(h + pt + pb), i64(w + pl + pr)), value, name=name)
