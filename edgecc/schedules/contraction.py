"""The register-tiled contraction template shared by the matmul, GEMV and conv2d rules.

A contraction block is `C[...] += X[...] * Y[...]` (reduction over one or more axes). One output axis is
the *vector axis* `v`: it indexes exactly one operand, V (plainly, `V[.., v, ..]`), so a row of the
register tile is a vector load of V. Another output axis, the *row axis* `r`, indexes the other operand,
S, whose elements are broadcast. The micro-kernel keeps an `mr x nr` tile of C in registers:

    for <outer loops, fused + parallel>:          # batch axes, v // nr, r // mr
        acc[mr, nr] = 0                           # vectorized
        for k...:                                 # reduction axes, in the block's order
            for ri in unroll(mr):
                for vi in vectorize(nr):
                    acc[ri, vi] += S[.., r, .., k] * Vp[.., v // nr, k, vi]
        C/epilogue[tile] = f(acc)                 # epilogue fused at the tile, vectorized

Matmul: v = the column j of B, r = the row i of A. Conv2d NCHW: v = the output channel (V = the weight,
packed), r = the output column (S = the input window). When V's rows are at least `pack_min_stride_bytes`
long (or V is not contiguous along v) the kernel packs V into `[.., v // nr, k.., nr]` (one contiguous
panel per tile column; for a weight given as [N, K] this is the transpose too): without it, rows whose
stride is a multiple of 4 KiB (GPT's 3072/2304-wide weights) map every k to the same cache sets and the
kernel ran at 15-40 GFLOP/s instead of ~150. With at least `min_parallel_tasks` panels, each panel is
packed inside the parallel panel loop right before its tiles (read once, consumed from cache, one
panel-sized buffer per task); otherwise all of V is packed first. A vector axis whose extent is not a
multiple of the tile is padded (`pad_einsum`, the padded panel packed the same way); the padded result is
then copied/epilogued by a separate vectorized elementwise stage. A GEMV pads nothing: it takes a tile of
whole half-vectors that divides the axis (memory-bound; padding would copy the matrix on every call).

Row tiles: `mr`, or a divisor of the row extent down to mr/2 + 1 (conv widths 7/14/28 take 7 rows: no
predicated partial tile). When the output's contiguous axis is the row axis (conv NCHW), the epilogue runs
vectorized along it, once per output row of a panel rather than per tile (`_row_epilogue`: whole-line
stores). A convolution's zero-padded input stays a separate stage (never inlined into the micro-kernel,
where it put a bounds check on every broadcast: 3x3 convs ran 3-4x slower).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import tvm
from tvm import s_tir, tirx

from edgecc.schedules import base
from edgecc.schedules.params import CpuParams


@dataclass
class Contraction:
    block: object  # SBlockRV of the reduction block
    out_buffer: object
    v_var: object
    r_var: object | None
    batch_v: list = field(default_factory=list)  # other spatial axes used by V
    batch_s: list = field(default_factory=list)  # other spatial axes not used by V
    red_vars: list = field(default_factory=list)
    extents: dict = field(default_factory=dict)
    v_index: int = 0  # which read region of the block is V
    v_dims: list = field(default_factory=list)  # per V dim: "v", "k" or "o"
    v_packable: bool = False  # every V index is a plain var or constant
    s_plain: bool = False  # every S index is a plain var or constant
    out_v_dim: int = 0  # which dim of C the vector axis indexes
    m_total: int = 1  # output rows (product of the axes that do not index V)
    dtype_bits: int = 32
    v_last_is_v: bool = True  # V's innermost dim is the vector axis (vector loads are contiguous)
    v_row_elems: int = 0  # elements of V's innermost dimension (its row stride)
    v_elems: int = 0  # elements of the V and S buffers (which operand is worth keeping in cache)
    s_elems: int = 0
    prepacked_nr: int = 0  # V already in panels at build time: V[.., v // nr, k.., v % nr] (no pack, no pad)
    s_load: object = None  # the S operand's load in the block (its buffer and indices)
    # set by `schedule`: the `prefetch.ChunkPrefetch` plans to add to the scheduled nest (K-blocked: the next
    # weight and input chunks; a GEMM packing V per panel: the next panel's V, residual and output lines)
    chunk_prefetch: list = field(default_factory=list)


def _plain(expr) -> bool:
    return isinstance(expr, (tirx.Var, tirx.IntImm))


def _prepacked_width(indices, var) -> int:
    """`nr` when `indices` read a build-time panel layout along `var`: `[.., var // nr, .., var % nr]` with
    every other index plain (`ir_passes.pack_conv_weights`), else 0."""
    last = indices[-1]
    if not (isinstance(last, tirx.FloorMod) and last.a.same_as(var) and isinstance(last.b, tirx.IntImm)):
        return 0
    nr = int(last.b)
    divs = [i for i in indices[:-1] if isinstance(i, tirx.FloorDiv)]
    if (len(divs) != 1 or not divs[0].a.same_as(var) or not isinstance(divs[0].b, tirx.IntImm)
            or int(divs[0].b) != nr):
        return 0
    if not all(_plain(i) for i in indices[:-1] if not isinstance(i, tirx.FloorDiv)):
        return 0
    return nr


def analyze(sch: s_tir.Schedule, block, lanes: int) -> Contraction | None:
    """Recognise `C[..] = C[..] + f(X[..], Y[..])` and pick the vector and row axes."""
    stmt = sch.get(block)
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or stmt.init is None:
        return None
    out = body.buffer
    if not str(out.dtype).startswith("float"):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    acc_side = None
    for side, other in ((value.a, value.b), (value.b, value.a)):
        if (isinstance(side, base.LoadNode) and side.source.same_as(out)
                and all(x.same_as(y) for x, y in zip(side.indices, body.indices))):
            acc_side = other
            break
    if acc_side is None:
        return None
    loads = [ld for ld in base.loads_in(acc_side) if not ld.source.same_as(out)]
    if len(loads) != 2 or loads[0].source.same_as(loads[1].source):
        return None
    if not all(_plain(i) for i in body.indices):
        return None

    iters = list(stmt.iter_vars)
    extents = {}
    for iv in iters:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        extents[iv.var] = int(iv.dom.extent)
    spatial = [iv.var for iv in iters if int(iv.iter_type) == tirx.IterVar.DataPar]
    red = [iv.var for iv in iters if int(iv.iter_type) == tirx.IterVar.CommReduce]
    if not red:
        return None

    def used(load):
        s = set()
        for idx in load.indices:
            s |= base.vars_in(idx)
        return s

    uses = [used(ld) for ld in loads]
    out_vars = [i for i in body.indices if isinstance(i, tirx.Var)]

    best = None
    for var in spatial:
        if var not in out_vars:
            return None
        in_ops = [n for n in (0, 1) if var in uses[n]]
        if len(in_ops) != 1:
            continue
        vi = in_ops[0]
        vload = loads[vi]
        prepacked = _prepacked_width(vload.indices, var)
        if not prepacked and not any(idx.same_as(var) for idx in vload.indices):
            continue  # V indexed by an expression of v: no contiguous vector loads
        packable = bool(prepacked) or all(_plain(i) for i in vload.indices)
        ext = extents[var]
        score = (
            packable,
            ext % lanes == 0,
            bool(prepacked) or vload.indices[-1].same_as(var),
            body.indices[-1].same_as(var),
            ext,
        )
        if best is None or score > best[0]:
            best = (score, var, vi, prepacked)
    if best is None:
        return None
    _, v_var, vi, prepacked_nr = best
    vload, sload = loads[vi], loads[1 - vi]
    s_only = [x for x in spatial if not x.same_as(v_var) and x in uses[1 - vi] and x not in uses[vi]]
    r_var = None
    for idx in reversed(list(body.indices)):
        if any(idx.same_as(x) for x in s_only) and extents[idx] > 1:
            r_var = [x for x in s_only if idx.same_as(x)][0]
            break
    others = [x for x in spatial if not x.same_as(v_var) and (r_var is None or not x.same_as(r_var))]
    batch_v = [x for x in others if x in uses[vi]]
    batch_s = [x for x in others if x not in uses[vi]]
    m_total = 1
    for x in spatial:
        if x not in uses[vi]:
            m_total *= extents[x]

    # which read region of the block is V
    v_index = None
    for n, region in enumerate(stmt.reads):
        if region.source.same_as(vload.source):
            v_index = n
    if v_index is None:
        return None
    v_dims = []
    for idx in vload.indices:
        if idx.same_as(v_var):
            v_dims.append("v")
        elif isinstance(idx, tirx.Var) and any(idx.same_as(k) for k in red):
            v_dims.append("k")
        else:
            v_dims.append("o")
    out_v_dim = [n for n, idx in enumerate(body.indices) if idx.same_as(v_var)][0]
    return Contraction(
        block=block,
        out_buffer=out,
        v_var=v_var,
        r_var=r_var,
        batch_v=batch_v,
        batch_s=batch_s,
        red_vars=red,
        extents=extents,
        v_index=v_index,
        v_dims=v_dims,
        v_packable=all(_plain(i) for i in vload.indices),
        s_plain=all(_plain(i) for i in sload.indices),
        out_v_dim=out_v_dim,
        m_total=m_total,
        dtype_bits=_dtype_bits(out.dtype),
        v_last_is_v=bool(prepacked_nr) or vload.indices[-1].same_as(v_var),
        v_row_elems=int(vload.source.shape[-1]) if isinstance(vload.source.shape[-1], tirx.IntImm) else 0,
        v_elems=_elems(vload.source),
        s_elems=_elems(sload.source),
        s_load=sload,
        prepacked_nr=prepacked_nr,
    )


def _elems(buf) -> int:
    shape = _static_shape(buf)
    return math.prod(shape) if shape is not None else 0


def _dtype_bits(dtype) -> int:
    return tvm.runtime.DataType(str(dtype)).bits


def choose_tile_width(n: int, nr: int, lanes: int) -> tuple[int, bool]:
    """(tile width, needs padding): the widest multiple of `lanes` up to `nr` dividing `n`, else pad."""
    for width in range(nr, lanes - 1, -lanes):
        if n % width == 0:
            return width, False
    if n < nr:
        return ((n + lanes - 1) // lanes) * lanes, True
    return nr, True


def half_vector_width(n: int, widest: int, lanes: int) -> int | None:
    """The widest tile of whole half-vectors, at most `widest`, that divides `n` (1000, 64, 16 -> 40), or None."""
    half = max(1, lanes // 2)
    fits = [w for w in range(widest, half - 1, -half) if n % w == 0]
    return fits[0] if fits else None


def choose_row_tile(m: int, mr: int, max_rows: int | None = None) -> int:
    """Rows of the register tile: the largest divisor of `m` from mr/2 + 1 up to `max_rows` (what the register
    file holds), so that no tile is partial, else `m` split into equal tiles of at most `mr` rows.

    Conv output widths 7, 14, 28 take 7 rows, 56 and 112 take 8, 27 takes 9 and 55 takes 11: a partial last
    tile puts a bounds test on every multiply-add of the micro-kernel (SqueezeNet: 0.94x the time of the model
    with 8-row tiles and a partial last one, in-process A/B), and of two whole tilings the taller one wins (55
    wide, 3x3 16 -> 64: 11 rows 0.84x the time of 5). 13 has no such divisor: two tiles of 7 and 6 rows ran
    0.86x the time of one 13-row tile (26 accumulators, more than the registers hold next to the broadcasts)."""
    if m <= mr:
        return m
    whole = [rows for rows in range(mr // 2 + 1, max(mr, max_rows or mr) + 1) if m % rows == 0]
    if whole:
        return whole[-1]
    tiles = -(-m // mr)
    return -(-m // tiles)


def _index_map(ndim: int, fn, dtype: str):
    return tirx.IndexMap.from_func(fn, ndim=ndim, index_dtype=dtype)


def _buffer_index_dtype(buf) -> str:
    shape = list(buf.shape)
    return str(shape[0].ty) if shape else "int64"


def schedule(
    sch: s_tir.Schedule,
    c: Contraction,
    params: CpuParams,
    *,
    fuse_epilogue: bool = True,
    allow_pad: bool = True,
    k_block: bool = False,
) -> s_tir.Schedule:
    """Apply the register-tile schedule to the contraction `c` (raises when a primitive refuses).

    `k_block` (convolutions): when a panel's whole output fits an L1-sized accumulator, split the reduction
    into chunks and walk all rows of the panel per chunk (see `_k_chunk`)."""
    lanes = params.lanes(c.dtype_bits)
    n_ext = c.extents[c.v_var]
    gemv = c.m_total <= params.gemv_max_rows
    nr_target = params.gemv_nr(c.dtype_bits) if gemv else params.nr(c.dtype_bits)
    nr, pad = choose_tile_width(n_ext, nr_target, lanes)
    if pad and gemv:
        # a matrix-vector product is memory-bound: padding would copy the whole matrix on every call, so
        # take a tile of whole half-vectors that divides the axis instead (1000 -> 40 = 2.5 vectors)
        fit = half_vector_width(n_ext, nr_target, lanes)
        if fit is not None:
            nr, pad = fit, False
    if pad and not (allow_pad and c.v_packable and c.s_plain):
        # pad_einsum needs plain indices everywhere: try half / quarter vectors instead
        narrow = [w for w in (lanes // 2, lanes // 4) if w >= 4 and n_ext % w == 0]
        if not narrow:
            raise ValueError(f"vector axis extent {n_ext} has no tile width (lanes {lanes}) and cannot be padded")
        nr, pad = narrow[0], False
    if c.prepacked_nr:
        # the panels were cut at build time (`ir_passes.pack_conv_weights`, with this same tile choice)
        nr, pad = c.prepacked_nr, False
        if n_ext % nr or nr % lanes:
            raise ValueError(f"build-time panels of width {nr} do not tile the vector axis ({n_ext}, lanes {lanes})")
    if gemv and not c.v_last_is_v:
        raise ValueError("matrix-vector product with a transposed matrix: not this template")
    mr = choose_row_tile(c.extents[c.r_var], params.mr, params.max_rows) if c.r_var is not None else 1
    if gemv and c.r_var is not None:
        mr = c.extents[c.r_var]
    row_bytes = c.v_row_elems * c.dtype_bits // 8
    pack = not c.prepacked_nr and (pad or (c.v_packable and not gemv and c.m_total >= params.pack_min_rows
                                           and (not c.v_last_is_v or row_bytes >= params.pack_min_stride_bytes)))
    block = c.block
    v_source = sch.get(block).reads[c.v_index].source
    intermediates = base.intermediate_buffers(sch)
    out_is_param = not any(b.same_as(c.out_buffer) for b in intermediates)

    # 1. pad the vector axis, pack V into [.., v // nr, k.., nr] panels. With enough panels to share out
    # among the cores, each panel is packed right before the tiles that use it (under the parallel panel
    # loop: read once, consumed from cache, and the buffer shrinks to one panel per task); otherwise (few
    # panels, or V is the smaller operand: a conv's weight next to a large input) the whole of V is packed
    # first, in its own parallel loop
    pack_block = None
    panel_prefetch = None  # (panel loop, row-tile loop) of a nest that packs V per panel
    panels = -(-n_ext // nr)
    for x in c.batch_v:
        panels *= c.extents[x]
    pack_at_panel = panels >= params.min_parallel_tasks and c.v_elems >= c.s_elems
    if pad:
        iters = sch.get(block).iter_vars
        sch.pad_einsum(block, [nr if iv.var.same_as(c.v_var) else 1 for iv in iters])
        v_buf = sch.get(block).reads[c.v_index].source
        producers = [p for p in sch.get_producers(block) if sch.get(p).writes[0].source.same_as(v_buf)]
        if len(producers) != 1:
            raise ValueError("pad_einsum produced no single V pad block")
        pack_block = producers[0]
    elif pack:
        pack_block = sch.cache_read(block, c.v_index, "global")
    if pack_block is not None:
        v_buf = sch.get(pack_block).writes[0].source
        dims = c.v_dims
        ndim = len(dims)
        o_dims = [d for d in range(ndim) if dims[d] == "o"]
        k_dims = [d for d in range(ndim) if dims[d] == "k"]
        v_dim = dims.index("v")
        width = nr

        def _pack_map(*idx):
            return ([idx[d] for d in o_dims] + [tirx.floordiv(idx[v_dim], width)]
                    + [idx[d] for d in k_dims] + [tirx.floormod(idx[v_dim], width)])

        sch.transform_layout(pack_block, ("write", 0), _index_map(ndim, _pack_map, _buffer_index_dtype(v_buf)))
        if not pack_at_panel:
            _schedule_pack(sch, pack_block, dims, nr, lanes, params)

    # 2. tile the reduction block
    lp = base.loop_of_iter(sch, block)
    if lp is None:
        raise ValueError("contraction block has non-trivial loop bindings")
    chunk = _k_chunk(c, params, nr, mr, panels) if (k_block and not gemv) else None
    row_epi = False
    vo, vi = sch.split(lp[c.v_var], [None, nr])
    ro = ri = None
    if c.r_var is not None and lp[c.r_var] is not None:
        if mr > 1:
            ro, ri = sch.split(lp[c.r_var], [None, mr])
        else:
            ro = lp[c.r_var]
    outer = [lp[x] for x in c.batch_v if lp[x] is not None] + [vo]
    outer += [lp[x] for x in c.batch_s if lp[x] is not None]
    if not (pack_block is not None and pack_at_panel) and c.s_elems > c.v_elems:
        # S (a conv's input) is the big operand: walk it once, all tile columns of V (the small packed
        # weight, cache-resident) inside each of its rows, instead of re-reading all of S per column
        outer = ([lp[x] for x in c.batch_v if lp[x] is not None]
                 + [lp[x] for x in c.batch_s if lp[x] is not None] + [vo])
    if ro is not None:
        outer.append(ro)
    reds = [lp[k] for k in c.red_vars if lp[k] is not None]
    inner = ([ri] if ri is not None else []) + [vi]
    if chunk is not None:
        # K-blocked: panel loops, then chunks of the reduction, then all rows of the panel, then the rest of
        # the chunk: one chunk of the packed panel (about L1/3) serves every row tile before the next is read;
        # the accumulator (the panel's whole output) stays in L1 across chunks
        k_var, k_in = chunk
        ko, ki = sch.split(lp[k_var], [None, k_in])
        panel = [lp[x] for x in c.batch_v if lp[x] is not None] + [vo]
        rows = [lp[x] for x in c.batch_s if lp[x] is not None] + ([ro] if ro is not None else [])
        reds = [ki if k.same_as(k_var) else lp[k] for k in c.red_vars if lp[k] is not None]
        sch.reorder(*panel, ko, *rows, *reds, *inner)
        outer = panel
        reds = [ko] + reds
        tile_loop = panel[-1]
    else:
        sch.reorder(*outer, *reds, *inner)
        tile_loop = outer[-1]
        row_epi = k_block and _row_epilogue(sch, c, block, params, nr, ro, outer)
        if row_epi:
            tile_loop = outer[-2]

    # 3. accumulate in a register tile; write back (or run the fused epilogue) per tile
    acc_write = sch.cache_write(block, 0, "local")
    out_ndim = len(sch.get(block).writes[0].source.shape)
    if c.out_v_dim != out_ndim - 1:
        perm = [d for d in range(out_ndim) if d != c.out_v_dim] + [c.out_v_dim]
        acc_buf = sch.get(block).writes[0].source
        sch.transform_layout(block, ("write", 0),
                             _index_map(out_ndim, lambda *idx: [idx[d] for d in perm],
                                        _buffer_index_dtype(acc_buf)))
    tile_blocks = []
    consumers = list(sch.get_consumers(acc_write))
    if fuse_epilogue and not pad and not out_is_param and consumers:
        sch.compute_inline(acc_write)
        for blk in base.top_blocks(sch):
            if blk in consumers or any(sch.get(blk).same_as(sch.get(cb)) for cb in consumers):
                sch.reverse_compute_at(blk, tile_loop, preserve_unit_loops=True)
                tile_blocks.append(blk)
    else:
        sch.reverse_compute_at(acc_write, tile_loop, preserve_unit_loops=True)
        tile_blocks.append(acc_write)

    # 4. parallel over the tiles (before decompose_reduction: parallel needs the reduction block whole)
    n_panel_loops = len([x for x in c.batch_v if lp[x] is not None]) + 1
    if pack_block is not None and pack_at_panel:
        panel_loops, rest = outer[:n_panel_loops], outer[n_panel_loops:]
        fused = sch.fuse(*panel_loops) if len(panel_loops) > 1 else panel_loops[0]
        sch.parallel(fused)
        if row_epi:  # the row-tile loop sits beside the epilogue: only the loops above it fuse
            rest = rest[:-1]
        if len(rest) > 1:
            rest = [sch.fuse(*rest)]
        if params.panel_prefetch and rest and not row_epi and chunk is None:
            panel_prefetch = (fused, rest[0])
        outer_levels = 2 if rest else 1
        sch.compute_at(pack_block, fused, preserve_unit_loops=True)
        _schedule_panel_pack(sch, pack_block, c.v_dims, nr, lanes)
    else:
        outer_levels = 1
        if row_epi:
            outer = outer[:-1]
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if (base.const_extent(sch, fused) or 0) > 1:
            sch.parallel(fused)

    # 5. vectorize / unroll the micro-kernel, split off the accumulator init
    sch.vectorize(vi)
    if ri is not None:
        sch.unroll(ri)
    for blk in tile_blocks:
        tile_part = sch.get_loops(blk)[outer_levels:]
        if (chunk is not None or row_epi) and tile_part and base.const_extent(sch, tile_part[-1]) == c.extents[c.r_var]:
            # the panel's epilogue: its loops cover whole output rows; vectorize along the row
            if writes_last_dim(sch, blk, tile_part[-1]):
                sch.vectorize(tile_part[-1])
            continue
        if tile_part and c.out_v_dim == len(tile_part) - 1 and base.const_extent(sch, tile_part[-1]) == nr:
            sch.vectorize(tile_part[-1])
        elif (tile_part and c.r_var is not None and mr in _VECTOR_ROWS and base.const_extent(sch, tile_part[-1]) == mr
              and writes_last_dim(sch, blk, tile_part[-1])):
            # the output's contiguous axis is the row axis (conv NCHW: x): the epilogue (scale, shift,
            # residual, ReLU) and the store run along it as vectors instead of one scalar per element
            sch.vectorize(tile_part[-1])
    if reds:
        init = sch.decompose_reduction(block, reds[0])
        sch.vectorize(sch.get_loops(init)[-1])

    if panel_prefetch is not None:
        c.chunk_prefetch = _next_panel_plans(sch, c, v_source, *panel_prefetch, tile_blocks, nr, params)
    if chunk is not None and c.prepacked_nr and params.kblock_prefetch_ahead and len(panel) == 1 and rows:
        c.chunk_prefetch = [_chunk_prefetch_plan(sch, c, v_source, fused, reds[0], rows, chunk[1], nr, params)]
        if params.kblock_prefetch_input:
            c.chunk_prefetch += _input_chunk_plan(sch, c, fused, panels, reds[0], rows, chunk[1], params)

    # 6. whatever is left at the root (pad copies, epilogues that could not be fused) is elementwise
    done = {sch.get(block).name_hint} | ({sch.get(pack_block).name_hint} if pack_block is not None else set())
    leftovers = [blk for blk in base.top_blocks(sch) if sch.get(blk).name_hint not in done]
    # a padded input (if_then_else: the conv's zero border) stays its own stage: inlined, it would put a
    # bounds check on every broadcast of the micro-kernel
    kept = [blk for blk in leftovers if base.has_if_then_else(sch, blk)]
    rest = base.try_inline_all(sch, [b for b in leftovers if b not in kept]) + kept
    from edgecc.schedules.elementwise import schedule_spatial_block

    for blk in rest:
        if base.is_spatial_block(sch, blk) and not sch.get(blk).name_hint.endswith("_init"):
            loops = sch.get_loops(blk)
            if loops and sch.get(loops[0]).kind != tirx.ForKind.PARALLEL:
                schedule_spatial_block(sch, blk, params)
    return sch


def _chunk_prefetch_plan(sch, c: Contraction, v_buffer, panel_loop, chunk_loop, row_loops, k_in: int, nr: int,
                         params: CpuParams):
    """The software prefetch of a K-blocked nest over build-time panels (see `prefetch.py`): each row tile
    fetches its share of the next chunk before its reduction starts."""
    from edgecc.schedules.prefetch import ChunkPrefetch

    k_total = 1
    for k in c.red_vars:
        k_total *= c.extents[k]
    chunk_elems = k_in * (k_total // c.extents[c.red_vars[0]]) * nr
    step, steps = _row_steps(sch, row_loops)
    start = sch.get(panel_loop).loop_var * (k_total * nr) + sch.get(chunk_loop).loop_var * chunk_elems
    return ChunkPrefetch(v_buffer, sch.get(row_loops[-1]).loop_var, start, chunk_elems, step, steps,
                         ahead=params.kblock_prefetch_ahead)


def _next_panel_plans(sch, c: Contraction, v_source, panel_loop, row_loop, tile_blocks, nr: int,
                      params: CpuParams) -> list:
    """Prefetches, spread over a panel's row tiles, of what the next panel reads and writes, for a GEMM that
    packs each panel of V (the columns `nr` wide) right before its tiles: V's next `K x nr` columns, and the
    next `M x nr` columns of the epilogue's operands shaped like the output (a residual) and of the output.

    Why: these are column panels of row-major matrices, K or M rows of 128 bytes each, one stream per row,
    which the hardware prefetchers do not follow; at 2 threads half of them were written by the other core
    in the previous kernel. ResNet-50's 1x1 convs at 56x56 (as GEMMs over 3136 columns) ran 1.2-1.5x
    onnxruntime's time in sequence, 1.0-1.1x alone. Three ResNet bottleneck blocks at 56x56, builds A/B in one
    process: 0.91x (2 threads) and 0.89x (1 thread) the time without these prefetches; MiniLM and GPT prefill
    unchanged (0.99-1.00x). A plan that would put more than `params.prefetch_max_lines` prefetches in each row
    tile is dropped (a long reduction: GPT's K = 3072 gave 384 per tile and its prefill took 4 minutes to
    compile, 14 s with the cap)."""
    from edgecc.schedules.prefetch import ChunkPrefetch

    def _2d(buf):
        shape = _static_shape(buf)
        return shape if shape is not None and len(shape) == 2 else None

    panel = sch.get(panel_loop).loop_var
    step, steps = _row_steps(sch, [row_loop])
    plans = []

    def _columns(buf, write=False):
        rows, cols = _2d(buf)
        plan = ChunkPrefetch(buf, sch.get(row_loop).loop_var, panel * nr, rows * nr, step, steps, ahead=1,
                             row_elems=nr, row_stride=cols, advance=nr, write=write)
        if plan.lines_per_step <= params.prefetch_max_lines:
            plans.append(plan)

    what = params.panel_prefetch
    if what & 1 and c.v_dims == ["k", "v"] and _2d(v_source):
        _columns(v_source)
    out = _2d(c.out_buffer)
    if out is None or c.out_v_dim != 1 or not what & 2:
        return plans
    for buf, write in _epilogue_buffers(sch, tile_blocks, out, v_source):
        _columns(buf, write)
    return plans


def _static_shape(buf) -> list | None:
    shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in buf.shape]
    return None if None in shape else shape


def _epilogue_buffers(sch, tile_blocks, out_shape: list, exclude) -> list:
    """[(buffer, written)]: the function's buffers of shape `out_shape` that the epilogue blocks read (a
    residual) or write (the output), each once, `exclude` left out."""
    intermediates = base.intermediate_buffers(sch)
    found = []
    for blk in tile_blocks:
        stmt = sch.get(blk)
        written = [w.source for w in stmt.writes]
        for buf in [r.source for r in stmt.reads] + written:
            if (buf.same_as(exclude) or any(buf.same_as(b) for b in intermediates) or _static_shape(buf) != out_shape
                    or any(buf.same_as(f) for f, _ in found)):
                continue
            found.append((buf, any(buf.same_as(w) for w in written)))
    return found


def _row_steps(sch, row_loops):
    """(the row tile's index among a chunk's row tiles, their number): each prefetch plan spreads its lines
    over these steps."""
    step, steps = None, 1
    for lp in (sch.get(x) for x in row_loops):
        step = lp.loop_var if step is None else step * lp.extent + lp.loop_var
        steps *= int(lp.extent)
    return step, steps


def _input_chunk_plan(sch, c: Contraction, panel_loop, panels: int, chunk_loop, row_loops, k_in: int,
                      params: CpuParams) -> list:
    """The prefetch of the input's next chunk in a K-blocked nest, when that chunk is one contiguous range (the
    chunked reduction axis, a conv's input channel, is the input's outermost axis of extent > 1: NCHW, batch 1).

    Why: at 2+ threads a kernel's input was mostly written by the other core in the previous kernel, and the
    nest reads it one channel row at a time across the chunk's channels (128 streams for a 1x1 conv), which
    the hardware prefetchers do not follow: ResNet-50's 1024 -> 256 1x1 conv at 14x14 scaled 1.3x from one to
    two threads in a chain of such convs and 1.95x as a one-op file (whose input stays cached in both cores);
    rewriting that input from one core before each call cost the same ~0.2 ms. Only the first panel of each
    thread's share (static ranges of ceil(panels / cores)) prefetches: by the next one the input is in this
    core's L2, and prefetching it again cost 6-8% on convs with many panels (256 -> 1024 at 14x14)."""
    from edgecc.schedules.prefetch import ChunkPrefetch

    load = c.s_load
    if load is None or not c.red_vars:
        return []
    shape = _static_shape(load.source)
    pos = [n for n, idx in enumerate(load.indices) if idx.same_as(c.red_vars[0])]
    if shape is None or len(pos) != 1 or any(shape[d] != 1 for d in range(pos[0])):
        return []
    step, steps = _row_steps(sch, row_loops)
    chunk_elems = k_in * math.prod(shape[pos[0] + 1:])
    share = -(-panels // max(1, params.num_cores))
    first = tirx.floormod(sch.get(panel_loop).loop_var, share) == 0
    return [ChunkPrefetch(load.source, sch.get(row_loops[-1]).loop_var, sch.get(chunk_loop).loop_var * chunk_elems,
                          chunk_elems, step, steps, ahead=1, when=first)]


def _k_chunk(c: Contraction, params: CpuParams, nr: int, mr: int, panels: int):
    """(reduction var, chunk extent) for a K-blocked loop nest, or None.

    Worth it when a panel of V (all of K x nr) is larger than L1: untiled, it is streamed from L2 once per row
    tile (7x7 and 14x14 convs with K = 512..4608 ran at 105-160 GFLOP/s). The accumulator kept across the
    chunks is the panel's whole output, at most `kblock_acc_bytes` (7x7 and 14x14 outputs; splitting larger
    outputs into groups of rows measured slower), and the panels are the parallel loop.
    """
    if c.r_var is None or mr <= 1 or not c.red_vars or panels < params.min_parallel_tasks:
        return None
    elem = c.dtype_bits // 8
    rows = c.extents[c.r_var]
    for x in c.batch_s:
        rows *= c.extents[x]
    if rows * nr * elem > params.kblock_acc_bytes:
        return None
    k_total = 1
    for k in c.red_vars:
        k_total *= c.extents[k]
    chunk_k = params.kblock_chunk_bytes // (nr * elem)  # reduction steps per chunk
    if k_total < 2 * chunk_k:
        return None
    k_var = c.red_vars[0]  # the outermost reduction axis (a conv's input channel)
    inner = k_total // c.extents[k_var]  # the kernel window (ry, rx) stays whole inside a chunk
    fits = [d for d in range(1, c.extents[k_var] + 1) if c.extents[k_var] % d == 0 and d * inner <= chunk_k]
    if not fits or fits[-1] == c.extents[k_var]:  # a window larger than a chunk, or a single chunk
        return None
    return k_var, fits[-1]


def _row_epilogue(sch, c: Contraction, block, params: CpuParams, nr: int, ro, outer) -> bool:
    """Whether a convolution's epilogue should run once per output row instead of once per register tile.

    An NCHW conv tiles `mr` output columns x `nr` channels; with the epilogue at the tile, each tile stores
    nr channel rows of mr floats (32 bytes for mr = 8), half a cache line each, 12.5 KB apart (56x56): in a
    model, where the output buffer is cold, every tile's stores are nr partial-line misses. Moved to the
    row loop, the tiles accumulate a whole output row of the panel in an L1 buffer (`W x nr`, at most
    `kblock_acc_bytes`; LLVM keeps each tile's part in registers across the reduction, as in the K-blocked
    nest) and the epilogue stores nr runs of W contiguous floats. Measured (edgecc builds A/B, in sequence):
    SqueezeNet 0.92x (1 thread) / 0.89x (2 threads), Inception-v2 0.98x / 0.97x, three ResNet bottlenecks at
    56x56 against onnxruntime single-thread 1.06-1.09x -> 1.01x. `EDGECC_ROW_EPILOGUE=0` turns it off."""
    if os.environ.get("EDGECC_ROW_EPILOGUE", "1") == "0":
        return False
    if ro is None or len(outer) < 2 or not outer[-1].same_as(ro) or c.r_var is None:
        return False
    if c.out_v_dim == len(sch.get(block).writes[0].source.shape) - 1:
        return False  # the vector axis is the contiguous one (NHWC, GEMM): tile stores are whole vectors already
    return c.extents[c.r_var] * nr * (c.dtype_bits // 8) <= params.kblock_acc_bytes


_VECTOR_ROWS = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16)  # row tiles whose epilogue is vectorized along the row axis


def writes_last_dim(sch, blk, loop) -> bool:
    """Whether `loop` drives the last (contiguous) index of the buffer `blk` writes."""
    stmt = sch.get(blk)
    if len(stmt.writes) != 1:
        return False
    loop_var = sch.get(loop).loop_var
    values = base._get_sblock_realize(sch, blk).iter_values
    last = stmt.writes[0].region[-1].min
    for iv, val in zip(stmt.iter_vars, values):
        if isinstance(last, tirx.Var) and last.same_as(iv.var):
            return loop_var in base.vars_in(val)
    return False


def _schedule_panel_pack(sch, pack_block, dims, nr, lanes):
    """A pack computed under the panel loop: its own loops follow V's dims; the vector axis goes innermost
    (contiguous writes of one panel row) and is vectorized."""
    loops = sch.get_loops(pack_block)
    own = loops[len(loops) - len(dims):]
    if len(own) != len(dims):
        return
    v_loop = own[dims.index("v")]
    others = [lp for d, lp in zip(dims, own) if d != "v"]
    sch.reorder(*others, v_loop)
    ext = base.const_extent(sch, v_loop)
    if ext == nr and nr % lanes == 0:
        if nr > lanes:
            _, v_loop = sch.split(v_loop, [None, lanes])
        sch.vectorize(v_loop)


def _schedule_pack(sch, pack_block, dims, nr, lanes, params):
    """Pack loops: [o.., v // nr, k.., v % nr] with the outer ones parallel, the panel row vectorized."""
    loops = sch.get_loops(pack_block)
    if len(loops) != len(dims):
        return
    v_loop = loops[dims.index("v")]
    vo, vi = sch.split(v_loop, [None, nr])
    o_loops = [loops[d] for d in range(len(dims)) if dims[d] == "o"]
    k_loops = [loops[d] for d in range(len(dims)) if dims[d] == "k"]
    sch.reorder(*o_loops, vo, *k_loops, vi)
    outer = o_loops + [vo]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if (base.const_extent(sch, fused) or 0) > 1:
        sch.parallel(fused)
    if nr % lanes == 0:
        _, vv = sch.split(vi, [None, lanes])
        sch.vectorize(vv)
