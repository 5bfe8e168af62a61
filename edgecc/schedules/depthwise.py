"""Grouped and depthwise convolutions (NCHW and NHWC, any stride, padding and window) as a direct conv.

`LegalizeOps` gives `conv[n, f, y, x] += pad[n, f // Fg * Cg + rc, y*s + ry, x*s + rx] * W[f, rc, ry, rx]`
(NHWC: `conv[n, y, x, f]`, `W[ry, rx, rc, f]`): the output channel `f` indexes both operands, so neither is
a plain vector operand and the implicit-GEMM template (`conv2d`) declines it. A depthwise conv does 9 or 25
multiply-adds per output element, too few to amortise packing; what it needs is vector loads along the
output's contiguous axis and enough independent accumulators. So the schedule is direct:

    for n, channel groups[, rows] in parallel:       # the padded input of that range: a per-task buffer
        for tiles of (rows x vector):
            acc[rows, vector] = 0
            for rc, ry, rx (window unrolled):
                for r in unroll(rows): acc[r, :] += in[...] * w[...]      # vector along the output's last axis
            out[tile] = epilogue(acc)                                    # bias / clip fused, vectorized

The vector axis is the output's contiguous one (x in NCHW, the channel in NHWC); its width is a divisor of
that axis (a whole short row, e.g. 7 or 14, rather than a predicated vector tile). The tile's rows are
channels of one group that share the input (grouped convs, channel multipliers), otherwise output rows
(depthwise NCHW: consecutive rows reuse each other's input rows) or output columns (NHWC).

The zero-padded input is computed per parallel task (one channel's plane, or the rows its tiles read), with
its border and interior in separate loops so the interior is a plain vector copy. With stride s along the
vector axis it is stored deinterleaved (`[.., w % s, w // s]`), so every window column reads a contiguous
vector instead of a strided one (which TVM's vectorizer lowers to one scalar load per lane). (Fusing the
spatial axes of 1x1 convs into one vector axis was tried: the vectorizer does not fold `(i // W) * W + i % W`
back into `i`, so the loads became gathers and ShuffleNet's pointwise convs ran several times slower.)
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from edgecc.schedules import base, contraction
from edgecc.schedules.matmul import find_contraction_block
from edgecc.schedules.params import CpuParams
from edgecc.targets.registry import TargetSpec


@dataclass
class GroupedConv:
    block: object
    out_vars: list  # the output's index vars, in layout order (the last one is contiguous)
    f_var: object  # output channel: indexes the weight and (through its group) the input
    rc_var: object | None  # input channel within the group
    window: list  # the other reduction vars (ry, rx)
    extents: dict
    groups: int
    fg: int  # output channels per group
    cg: int  # input channels per group
    in_buffer: object  # the (padded) input the block reads
    in_indices: list
    dtype_bits: int = 32


def _plain(expr) -> bool:
    return isinstance(expr, (tirx.Var, tirx.IntImm))


def analyze(sch: s_tir.Schedule, block) -> GroupedConv | None:
    """Recognise `C[..] += In[.., g(f)*Cg + rc, ..] * W[.., f, ..]` with f indexing both operands."""
    stmt = sch.get(block)
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or stmt.init is None:
        return None
    out = body.buffer
    if not str(out.dtype).startswith("float") or len(body.indices) < 3:
        return None
    if not all(isinstance(i, tirx.Var) for i in body.indices):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    other = None
    for side, rest in ((value.a, value.b), (value.b, value.a)):
        if isinstance(side, base.LoadNode) and side.source.same_as(out):
            other = rest
    if other is None or not isinstance(other, tirx.Mul):
        return None
    loads = [other.a, other.b]
    if not all(isinstance(ld, base.LoadNode) for ld in loads) or loads[0].source.same_as(loads[1].source):
        return None
    extents = {}
    for iv in stmt.iter_vars:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        extents[iv.var] = int(iv.dom.extent)
    spatial = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == tirx.IterVar.DataPar]
    red = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == tirx.IterVar.CommReduce]
    if not red or len(spatial) != len(body.indices):
        return None
    # the weight: every index a plain var, exactly one of them an output axis (the channel f)
    wi = [n for n, ld in enumerate(loads) if all(_plain(i) for i in ld.indices)]
    for n in wi:
        w, inp = loads[n], loads[1 - n]
        f_vars = [v for v in spatial if any(i.same_as(v) for i in w.indices)]
        if len(f_vars) != 1:
            continue
        f = f_vars[0]
        ch_dims = [d for d, idx in enumerate(inp.indices) if f in base.vars_in(idx)]
        if len(ch_dims) != 1:
            continue  # f must reach the input through its group (that is what makes the conv grouped)
        ch_idx = inp.indices[ch_dims[0]]
        rc = [r for r in red if r in base.vars_in(ch_idx)]
        if len(rc) > 1:
            continue
        rc_var = rc[0] if rc else None
        cg = extents[rc_var] if rc_var is not None else 1
        c_in = inp.source.shape[ch_dims[0]]
        if not isinstance(c_in, tirx.IntImm) or int(c_in) % cg:
            continue
        groups = int(c_in) // cg
        if groups < 2 or extents[f] % groups:
            continue
        window = [r for r in red if rc_var is None or not r.same_as(rc_var)]
        out_vars = list(body.indices)
        return GroupedConv(block=block, out_vars=out_vars, f_var=f, rc_var=rc_var, window=window,
                           extents=extents, groups=groups, fg=extents[f] // groups, cg=cg,
                           in_buffer=inp.source, in_indices=list(inp.indices),
                           dtype_bits=tvm.runtime.DataType(str(out.dtype)).bits)
    return None


def choose_vector_width(n: int, lanes: int, max_width: int, *, pow2_wide: bool = False) -> int:
    """Vector width for an axis of `n`: the divisor of `n` up to `max_width` that uses the most of the vectors
    it occupies, the wider on ties (at 16 lanes: 7 -> 7, 28 -> 28, 112 -> 16).

    `pow2_wide`: a vector wider than one register must be a power of two (x86: LLVM's x86 backend loads a
    <28 x float>, <48 x float> or <56 x float> one scalar at a time; a register or less, e.g. <14 x float>,
    and powers of two are fine. AArch64 splits the odd widths into whole registers.) 28 -> 14 there."""
    best = (0.0, 0)
    for d in range(1, min(n, max_width) + 1):
        if n % d or (pow2_wide and d > lanes and d & (d - 1)):
            continue
        util = d / (-(-d // lanes) * lanes)
        if (util, d) > best:
            best = (util, d)
    return best[1] or 1


def schedule(sch: s_tir.Schedule, c: GroupedConv, params: CpuParams, *, fuse_epilogue: bool = True,
             pow2_wide: bool = False):
    """The direct grouped-conv schedule (raises when a primitive refuses); `pow2_wide`: see
    `choose_vector_width`."""
    block = c.block
    lanes = params.lanes(c.dtype_bits)
    if not c.out_vars[-1].same_as(c.f_var):
        _deinterleave_strided_input(sch, c)
    max_width = max(lanes, params.nr(c.dtype_bits) * 2)
    half_regs = max(2, params.vector_regs // 2)  # accumulators: about half the register file
    lp = base.loop_of_iter(sch, block)
    if lp is None:
        raise ValueError("grouped conv block has non-trivial loop bindings")
    f = c.f_var
    vec_var = c.out_vars[-1]
    channels_last = vec_var.same_as(f)
    spatial = [v for v in c.out_vars if not v.same_as(f)]  # n, y, x (layout order)
    ext = dict(c.extents)

    spatial_loops = [lp[v] for v in spatial]

    outer, row_inner, vec_inner = [], None, None
    if channels_last:
        # NHWC: vector = channels, rows = output columns
        width = choose_vector_width(ext[f], lanes, max_width, pow2_wide=pow2_wide)
        f_o, vec_inner = sch.split(lp[f], [None, width])
        regs = -(-width // lanes)
        x_loop = spatial_loops[-1]
        rows = _row_tile(ext[spatial[-1]], max(1, min(params.mr, half_regs // regs)))
        if rows > 1:
            x_o, row_inner = sch.split(x_loop, [None, rows])
        else:
            x_o = x_loop
        outer = [x for x in spatial_loops[:-1] if x is not None] + [x_o, f_o]
    else:
        # NCHW: vector = the output's last spatial axis; rows = channels sharing the input, else output rows
        width = choose_vector_width(ext[vec_var], lanes, max_width, pow2_wide=pow2_wide)
        v_o, vec_inner = sch.split(spatial_loops[-1], [None, width])
        regs = -(-width // lanes)
        max_rows = max(1, min(params.mr, half_regs // regs))
        f_loops = [lp[f]]
        if c.fg > 1:
            g_loop, fg_loop = sch.split(lp[f], [None, c.fg])
            f_loops = [g_loop, fg_loop]
        mid = [x for x in spatial_loops[1:-1]]  # y (absent for conv1d)
        f_rows = _row_tile(c.fg, max_rows, exact=True) if c.fg > 1 else 1
        if f_rows >= max(2, max_rows // 2) or (not mid and f_rows > 1):
            fg_o, row_inner = sch.split(f_loops[-1], [None, f_rows])
            f_loops[-1] = fg_o
        elif mid:
            rows = _row_tile(ext[spatial[-2]], max_rows)
            if rows > 1:
                y_o, row_inner = sch.split(mid[-1], [None, rows])
                mid[-1] = y_o
        outer = [x for x in spatial_loops[:1] if x is not None] + f_loops + mid + [v_o]

    reds = ([lp[c.rc_var]] if c.rc_var is not None and lp[c.rc_var] is not None else [])
    reds += [lp[r] for r in c.window if lp[r] is not None]
    inner = ([row_inner] if row_inner is not None else []) + [vec_inner]
    sch.reorder(*outer, *reds, *inner)

    # accumulate in registers, write back (or run the fused epilogue) per tile
    intermediates = base.intermediate_buffers(sch)
    out_is_param = not any(b.same_as(sch.get(block).writes[0].source) for b in intermediates)
    acc_write = sch.cache_write(block, 0, "local")
    tile_loop = outer[-1]
    tile_blocks = []
    consumers = list(sch.get_consumers(acc_write))
    if fuse_epilogue and not out_is_param and consumers:
        sch.compute_inline(acc_write)
        for blk in base.top_blocks(sch):
            if any(sch.get(blk).same_as(sch.get(cb)) for cb in consumers):
                sch.reverse_compute_at(blk, tile_loop, preserve_unit_loops=True)
                tile_blocks.append(blk)
    else:
        sch.reverse_compute_at(acc_write, tile_loop, preserve_unit_loops=True)
        tile_blocks.append(acc_write)

    # parallel over the leading tile loops: enough tasks per core, as few split rows as that allows
    chosen, work = [], 1
    for loop in outer:
        chosen.append(loop)
        work *= base.const_extent(sch, loop) or 1
        if work >= params.min_parallel_tasks * 4:
            break
    par = sch.fuse(*chosen) if len(chosen) > 1 else chosen[0]
    if (base.const_extent(sch, par) or 0) > 1:
        sch.parallel(par)
    tile_levels = len(outer) - len(chosen) + 1  # loops above the tile's own after the fuse

    # the padded input: computed per parallel task, only the region its tiles read
    for blk in base.top_blocks(sch):
        if base.has_if_then_else(sch, blk) and any(
                sch.get(cb).same_as(sch.get(block)) for cb in sch.get_consumers(blk)):
            sch.compute_at(blk, par, preserve_unit_loops=True)
            _vectorize_pad(sch, blk, 1, lanes, params)

    # micro-kernel: vector axis vectorized, rows and the window unrolled
    sch.vectorize(vec_inner)
    if row_inner is not None:
        sch.unroll(row_inner)
    window_size = 1
    for r in c.window:
        window_size *= c.extents[r]
    if window_size <= 2 * params.max_unroll:
        for r in c.window:
            if lp[r] is not None:
                sch.unroll(lp[r])
    for blk in tile_blocks:
        own = sch.get_loops(blk)[tile_levels:]
        if own and contraction.writes_last_dim(sch, blk, own[-1]) and (base.const_extent(sch, own[-1]) or 0) > 1:
            sch.vectorize(own[-1])
            for lp_ in own[:-1]:
                if (base.const_extent(sch, lp_) or 0) > 1:
                    sch.unroll(lp_)
    if reds:
        init = sch.decompose_reduction(block, reds[0])
        init_loops = sch.get_loops(init)
        if init_loops and (base.const_extent(sch, init_loops[-1]) or 0) > 1:
            sch.vectorize(init_loops[-1])

    # anything else left at the root (an unfusable epilogue, a pad copy read elsewhere) is elementwise
    from edgecc.schedules.elementwise import schedule_spatial_block

    for blk in base.top_blocks(sch):
        loops = sch.get_loops(blk)
        if (base.is_spatial_block(sch, blk) and loops and sch.get(loops[0]).kind != tirx.ForKind.PARALLEL
                and not sch.get(blk).name_hint.endswith("_init")):
            schedule_spatial_block(sch, blk, params)
    return sch


def _input_stride(c: GroupedConv) -> int:
    """How far the input moves per step of the output's last axis (the conv's stride along it)."""
    from tvm.sym import detect_linear_equation

    vec, idx = c.out_vars[-1], c.in_indices[-1]
    if vec not in base.vars_in(idx) or any(vec in base.vars_in(i) for i in c.in_indices[:-1]):
        return 0  # only the input's last (contiguous) dim is deinterleaved
    coeff = detect_linear_equation(idx, [vec])
    return int(coeff[0]) if len(coeff) == 2 and isinstance(coeff[0], tirx.IntImm) else 0


def _deinterleave_strided_input(sch: s_tir.Schedule, c: GroupedConv) -> None:
    """Stride s along the vector axis: store the padded input as [.., w % s, w // s], so that each window
    column reads a contiguous vector (`in[.., (x*s + rx) % s, (x*s + rx) // s]` = `[.., rx % s, x + rx // s]`)
    instead of a strided one, which the vectorizer turns into one scalar load per lane. The pad stage then
    iterates in the new layout (contiguous stores)."""
    s = _input_stride(c)
    if s < 2:
        return
    pads = [b for b in base.top_blocks(sch)
            if sch.get(b).writes and sch.get(b).writes[0].source.same_as(c.in_buffer)]
    if len(pads) != 1 or not base.has_if_then_else(sch, pads[0]):
        return  # the input is a parameter (no padding): its layout is not ours to change
    pad = pads[0]
    ndim = len(c.in_buffer.shape)
    width = int(c.in_buffer.shape[-1])
    dtype = str(c.in_buffer.shape[-1].ty)

    def split_last(*idx):
        return [*idx[:-1], tirx.floormod(idx[-1], s), tirx.floordiv(idx[-1], s)]

    imap = tirx.IndexMap.from_func(split_last, ndim=ndim, index_dtype=dtype)
    sch.transform_layout(pad, ("write", 0), imap, pad_value=None if width % s == 0 else 0.0)
    if width % s == 0:
        sch.transform_block_layout(pad, imap)


def _row_tile(m: int, rows: int, *, exact: bool = False) -> int:
    """Rows of the register tile: a divisor of `m` up to `rows` (at least rows/2 + 1), else `rows`.

    `exact`: only a divisor (channels within a group: a partial tile there makes the epilogue's region,
    computed over the group split, spill into the next group)."""
    if m <= rows:
        return m
    for r in range(rows, rows // 2 if not exact else 0, -1):
        if m % r == 0:
            return r
    return rows


def _vectorize_pad(sch, blk, levels, lanes, params) -> None:
    """The per-task pad copy: its rows and its innermost loop (the padded row, contiguous also after a
    deinterleave) split into border / interior / border, the interior vectorized. Over the whole row the
    zero-padding condition differs per lane and the vectorizer scalarizes the copy (it then cost more than
    the conv); over the interior it folds away."""
    loops = sch.get_loops(blk)
    if len(loops) <= levels:
        return
    inner = loops[-1]
    if len(loops) > levels + 1:
        # interior rows first (the loop that moves the input's second-to-last dim), then columns within them
        rows = [lp for lp in loops[levels:-1] if _interior(sch, blk, lp, dim=-2) is not None]
        if rows:
            row_span = _interior(sch, blk, rows[-1], dim=-2)
            middle = _partition(sch, rows[-1], row_span)
            if middle is not None:
                (blk,) = sch.get_child_blocks(middle)
                inner = sch.get_loops(blk)[-1]
    ext = base.const_extent(sch, inner)
    span = _interior(sch, blk, inner, dim=-1)
    if ext is None or span is None:
        base.vectorize_innermost(sch, blk, lanes, params)
        return
    strided = span[2] != 1
    if min(ext, span[1]) - max(0, span[0]) < lanes and not strided:
        base.vectorize_innermost(sch, blk, lanes, params)
        return
    middle = _partition(sch, inner, span)
    if middle is not None and not strided:  # one (multi-register) vector per row: it cannot be split again
        sch.vectorize(middle)
    # a strided read (the deinterleave of a stride-2 conv) stays a plain loop: TVM's vectorizer makes one
    # scalar load per lane of it, LLVM's loop vectorizer wide loads and permutes


def _partition(sch, loop, span):
    """Split `loop` at [lo, hi) of `span`; returns the middle loop (None when it is empty)."""
    ext = base.const_extent(sch, loop)
    lo, hi = max(0, span[0]), min(ext, span[1])
    if hi <= lo:
        return None
    sizes = [n for n in (lo, hi - lo, ext - hi) if n > 0]
    if len(sizes) == 1:
        return loop
    parts = sch.loop_partition(loop, sizes[:-1] + [None])
    return parts[1 if lo > 0 else 0]


def _interior(sch, blk, loop, dim: int = -1):
    """(lo, hi, step): [lo, hi) are the values of `loop` for which the pad block copies the input (no border),
    `step` how far the copy moves in the input per iteration; None when the block is not of that form."""
    from tvm.sym import detect_linear_equation

    stmt = sch.get(blk)
    written = stmt.writes[0].source if stmt.writes else None
    loads = [ld for ld in base.loads_in(stmt.body) if written is None or not ld.source.same_as(written)]
    if len(loads) != 1 or len(loads[0].indices) < -dim or not isinstance(loads[0].source.shape[dim], tirx.IntImm):
        return None
    index, in_w = loads[0].indices[dim], int(loads[0].source.shape[dim])
    loop_var = sch.get(loop).loop_var
    values = base._get_sblock_realize(sch, blk).iter_values
    exts = {iv.var: int(iv.dom.extent) for iv in stmt.iter_vars if isinstance(iv.dom.extent, tirx.IntImm)}
    own = [(iv.var, v) for iv, v in zip(stmt.iter_vars, values) if loop_var in base.vars_in(v)]
    if len(own) != 1:
        return None
    var, binding = own[0]
    if var not in base.vars_in(index):
        return None
    k = detect_linear_equation(binding, [loop_var])
    others = [v for v in base.vars_in(index) if not v.same_as(var)]
    coeff = detect_linear_equation(index, [var, *others])
    if (len(k) != 2 or not all(isinstance(x, tirx.IntImm) for x in k) or int(k[0]) != 1
            or len(coeff) != len(others) + 2 or not all(isinstance(x, tirx.IntImm) for x in coeff)
            or any(v not in exts for v in others)):
        return None
    a = int(coeff[0])
    if a <= 0:
        return None
    spread = [int(b) * (exts[v] - 1) for b, v in zip(coeff[1:-1], others)]
    lo_off = int(coeff[-1]) + sum(min(0, x) for x in spread)
    hi_off = int(coeff[-1]) + sum(max(0, x) for x in spread)
    v_lo = -(lo_off // a)  # ceil(-lo_off / a)
    v_hi = (in_w - 1 - hi_off) // a + 1
    return v_lo - int(k[1]), v_hi - int(k[1]), a


class GroupedConvRule(base.ScheduleRule):
    """Depthwise and grouped convolutions (the channel reaches the input through its group)."""

    name = "grouped_conv"

    def _prepare(self, sch: s_tir.Schedule):
        found = find_contraction_block(sch)
        if found is None:
            return None
        main, producers, consumers = found
        if analyze(sch, main) is None:
            return None
        for blk in reversed(producers):
            if not base.has_if_then_else(sch, blk):
                sch.compute_inline(blk)  # plain copies (a pad of zero), layout moves; raises when it cannot
        base.try_inline_all(sch, consumers)
        return main

    def apply(self, sch: s_tir.Schedule, spec: TargetSpec, params: CpuParams):
        def attempt(work: s_tir.Schedule, fuse_epilogue: bool):
            main = self._prepare(work)
            if main is None:
                return None
            c = analyze(work, main)
            if c is None:
                return None
            schedule(work, c, params, fuse_epilogue=fuse_epilogue, pow2_wide=spec.arch == "x86_64")
            return work

        return base.with_epilogue_fallback(sch.mod, attempt)
