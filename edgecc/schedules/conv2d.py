"""Convolutions (conv2d NCHW, grouped/depthwise, conv1d) as implicit GEMM on the register-tile template.

`LegalizeOps` gives a pad block and `conv[n, f, y, x] += pad[n, c, y*s + ry, x*s + rx] * W[f, c, ry, rx]`.
The padded input stays a separate (parallel, vectorized) stage; the convolution uses the output channel
`f` as the vector axis (weights packed into `[f // nr, c, ry, rx, nr]` panels, i.e. the weight transpose
of an im2col GEMM) and the output column `x` as the broadcast row axis, so output widths of 7 or 56 need
no vector tail. When a whole panel's output fits in L1 (7x7 and 14x14 outputs) and its weights do not, the
reduction is K-blocked (`contraction._k_chunk`): each chunk of the panel serves every row before the next.
Otherwise the epilogue (bias, folded BatchNorm, residual, ReLU) and the store run once per output row of a
panel, along the row (`contraction._row_epilogue`), so a cold output buffer gets whole cache lines.
Grouped and depthwise convolutions (the channel indexes both operands, so no operand is a plain vector
operand) are not matched: `depthwise.GroupedConvRule`, next in the rule list, takes them.
"""

from __future__ import annotations

from edgecc.schedules.matmul import Matmul


class Conv2d(Matmul):
    name = "conv2d"
    want_plain_s = False  # the input operand is indexed by y*s + ry, x*s + rx
    k_block = True  # small outputs with long reductions: chunk the reduction (contraction.schedule)
