"""Kernels for quantized matmuls: `y[M, N] = x[M, K] @ dequant(W)[K, N]` reading the packed storage.

The weight is never materialised in float: each code is loaded from its uint32 word (or int8 byte),
shifted, masked and converted in registers, right where it is multiplied. The compute is written so that
the scale (and zero point) is applied once per group instead of once per weight:

    part[m, g, n] = sum_{j < G} x[m, g*G + j] * code[g*G + j, n]          (integer codes as float)
    xsum[m, g]    = sum_{j < G} x[m, g*G + j]                              (only when a zero point exists)
    y[m, n]       = sum_g scale[g, n] * (part[m, g, n] - zero[g, n] * xsum[m, g])

w8a8 quantizes each row of x to int8 at run time (scale = max|x| / 127) and accumulates in int32:

    y[m, n] = sx[m] * scale[0, n] * sum_k int32(xq[m, k]) * int32(code[k, n])

CPU schedule (`schedule_quantized`), one for GEMV (M = 1, LLM decode) and M > 1:

    parallel over (M/mr x N/nr) tiles; per tile an accumulator of mr x nr floats in registers;
    for each group g: part (mr x nr, local) <- unrolled j (32 codes: 4 uint32 words for 4-bit) x mr x
    vectorized nr; then acc += scale * (part - zero * xsum), vectorized.

`nr` is 2-4 vectors of the target (read from the LLVM target), `mr` up to 4 rows. The function returned is
marked `tirx.is_scheduled` so the default fp32 rules leave it alone.

With PANEL_MIN_ROWS (8) rows or more (prefill, encoders) decoding per row tile would repeat the decode M/mr
times, so the compute is instead a GEMM on a decoded panel: per column panel (in parallel) the [K, nr]
weights are decoded with scale and zero point once into a float buffer (L2-resident), then mr x nr register
tiles accumulate over all of K. Measured 128x576x1536 w4g32-asym: 2.1 ms vs 3.4 ms (2 threads, loaded).

Stored tensors are tile-major, [N / 64, rows, 64] (`QuantScheme.stored_shapes`): a column tile's rows are
one contiguous block, which the hardware prefetcher streams (row-major, a vocabulary-sized N put every row in
a new page: SmolLM2's w4 lm_head GEMV went from 4.1 to 2.4 ms, the whole w4 decode step from 42 to 17 ms).
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, te, tirx

from edgecc.compress.schemes import QuantScheme

log = logging.getLogger(__name__)

SCHEDULE_NAME = "quantized_matmul"


# ------------------------------------------------------------------------------------------ compute


def quantized_matmul_compute(m, k: int, n: int, scheme: QuantScheme, x_dtype: str = "float32"):
    """TE tensors (args list) for one quantized matmul; `m` may be an int or a tirx.Var."""
    g_size = scheme.group_for(k)
    groups = k // g_size
    bits = scheme.bits
    shapes = scheme.stored_shapes(k, n)  # tile-major [N/T, rows, T]; `at` reads element (row, col)
    tile = shapes["scales"][0][2]
    x = te.placeholder((m, k), x_dtype, name="x")
    (w_shape, w_dtype) = shapes["weight"]
    w = te.placeholder(w_shape, w_dtype, name="qweight")
    s = te.placeholder(shapes["scales"][0], shapes["scales"][1], name="scales")
    z = te.placeholder(shapes["zeros"][0], "uint8", name="zeros") if "zeros" in shapes else None
    inputs = [x, w, s] + ([z] if z is not None else [])

    def at(buf, row, col):
        return buf[col // tile, row, col % tile]

    if scheme.dot_layout:
        def at_w(buf, row, col):  # the int8 dot-product layout (edgecc.schedules.int8_dot.pack_k4)
            return buf[col // tile, row // 4, (col % tile) * 4 + row % 4]

        if panel_rows(m):
            return inputs + [_w8a8_panel_compute(x, w, s, m, k, n, at, at_w)]
        return inputs + [_w8a8_compute(x, w, s, m, k, n, at, at_w)]

    words_per_group = g_size * bits // 32
    last_word = w_shape[1] - 1
    mask = tirx.const((1 << bits) - 1, "uint32")

    def code(g, j, col):
        """The code of weight (g*G + j, col) as float32, decoded in registers."""
        if bits == 8:
            return at(w, g * g_size + j, col).astype("float32")
        pos = j * bits
        word = g * words_per_group + pos // 32
        shift = (pos % 32).astype("uint32")
        val = at(w, word, col) >> shift
        if 32 % bits:  # a code may straddle two words
            nxt = at(w, tirx.min(word + 1, last_word), col) << (tirx.const(32, "uint32") - shift)
            val = tirx.if_then_else(pos % 32 + bits > 32, val | nxt, val)
        return (val & mask).astype("float32")

    has_zero = z is not None or scheme.zero_offset != 0
    if scheme.act_bits == 8:  # 4-bit a8: the activations on their per-(row, group) int8 grid
        x = _group_int8_grid(x, m, k, g_size)
    if panel_rows(m):
        # Many rows (prefill, encoders): decode each weight once into a float panel, shared by every row.
        def weight(kk, c):
            g = kk // g_size
            val = code(g, kk % g_size, c)
            if has_zero:
                zero = at(z, g, c).astype("float32") if z is not None else \
                    tirx.const(float(scheme.zero_offset), "float32")
                val = val - zero
            return at(s, g, c).astype("float32") * val

        wf = te.compute((k, n), weight, name="wf")
        r = te.reduce_axis((0, k), name="r")
        y = te.compute((m, n), lambda i, c: te.sum(x[i, r].astype("float32") * wf[r, c], axis=r), name="y")
        if x_dtype != "float32":
            y = te.compute((m, n), lambda i, c: y[i, c].astype(x_dtype), name="y_cast")
        return inputs + [y]

    j = te.reduce_axis((0, g_size), name="j")
    part = te.compute((m, groups, n), lambda i, g, c: te.sum(x[i, g * g_size + j].astype("float32") * code(g, j, c),
                                                            axis=j), name="part")
    if has_zero:
        j2 = te.reduce_axis((0, g_size), name="j2")
        xsum = te.compute((m, groups), lambda i, g: te.sum(x[i, g * g_size + j2].astype("float32"), axis=j2),
                          name="xsum")

    def term(i, g, c):
        if not has_zero:
            return part[i, g, c]
        zero = at(z, g, c).astype("float32") if z is not None else tirx.const(float(scheme.zero_offset), "float32")
        return part[i, g, c] - zero * xsum[i, g]

    gg = te.reduce_axis((0, groups), name="g")
    y = te.compute((m, n), lambda i, c: te.sum(at(s, gg, c).astype("float32") * term(i, gg, c), axis=gg), name="y")
    if x_dtype != "float32":
        y = te.compute((m, n), lambda i, c: y[i, c].astype(x_dtype), name="y_cast")
    return inputs + [y]


def _group_int8_grid(x, m, k: int, g_size: int):
    """x rounded to int8 codes per row and group of `g_size` features (scale max|x| / 127), as float:
    the activations `edgecc.schedules.int4_dot` multiplies, so the generic kernel computes the same function."""
    r = te.reduce_axis((0, g_size), name="ra")
    amax = te.compute((m, k // g_size), lambda i, g: te.max(te.abs(x[i, g * g_size + r].astype("float32")), axis=r),
                      name="amax")
    sx = te.compute((m, k // g_size), lambda i, g: tirx.Select(amax[i, g] > 0, amax[i, g] / 127.0,
                                                               tirx.const(1.0, "float32")), name="sx")

    def grid(i, c):
        q = tirx.round(x[i, c].astype("float32") / sx[i, c // g_size])
        return tirx.max(tirx.min(q, tirx.const(127.0, "float32")), tirx.const(-127.0, "float32")) * sx[i, c // g_size]

    return te.compute((m, k), grid, name="xg")


def _w8a8_panel_compute(x, w, s, m, k, n, at, at_w):
    """w8a8 for many rows as a float GEMM on the same integer grid: x quantized per row and dequantized
    (`round(x / sx) * sx`), weights decoded per panel as `code * scale`. Each product is the int8 x int8
    product times both scales, exactly; the sums are fp32 (exact integers up to 2^24, i.e. K <= 1040 at
    full range). Faster here than the int32 path, which LLVM does not turn into VNNI dot products."""
    r = te.reduce_axis((0, k), name="r")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, r].astype("float32")), axis=r), name="amax")
    sx = te.compute((m,), lambda i: tirx.Select(amax[i] > 0, amax[i] / 127.0, tirx.const(1.0, "float32")), name="sx")
    xfq = te.compute((m, k), lambda i, c: tirx.max(tirx.min(tirx.round(x[i, c].astype("float32") / sx[i]), 127.0),
                                                   -127.0) * sx[i], name="xfq")
    wf = te.compute((k, n), lambda kk, c: at_w(w, kk, c).astype("float32") * at(s, 0, c), name="wf")
    r2 = te.reduce_axis((0, k), name="r2")
    return te.compute((m, n), lambda i, c: te.sum(xfq[i, r2] * wf[r2, c], axis=r2), name="y")


def _w8a8_compute(x, w, s, m, k, n, at, at_w):
    r = te.reduce_axis((0, k), name="r")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, r].astype("float32")), axis=r), name="amax")
    sx = te.compute((m,), lambda i: tirx.Select(amax[i] > 0, amax[i] / 127.0, tirx.const(1.0, "float32")), name="sx")
    xq = te.compute((m, k), lambda i, c: tirx.max(tirx.min(tirx.round(x[i, c].astype("float32") / sx[i]), 127.0),
                                                  -127.0).astype("int8"), name="xq")
    kk = te.reduce_axis((0, k), name="j")
    acc = te.compute((m, n), lambda i, c: te.sum(xq[i, kk].astype("int32") * at_w(w, kk, c).astype("int32"), axis=kk),
                     name="part")
    return te.compute((m, n), lambda i, c: acc[i, c].astype("float32") * sx[i] * at(s, 0, c), name="y")


# ------------------------------------------------------------------------------------------ schedule


def _vector_lanes(target: tvm.target.Target | None) -> int:
    if target is None:
        return 4
    try:
        bits = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-LLVM or unknown CPU: 128-bit vectors
        bits = 128
    return max(1, bits // 32)


def _num_cores(target: tvm.target.Target | None) -> int:
    try:
        return max(1, int(target.attrs["num-cores"])) if target is not None else 1
    except Exception:  # noqa: BLE001
        return 1


def choose_tiles(m, n: int, target: tvm.target.Target | None) -> tuple[int, int]:
    """(mr, nr): rows and columns of one register tile."""
    lanes = _vector_lanes(target)
    cores = _num_cores(target)
    nr = lanes
    for vecs in (4, 2):
        # wide tiles, unless that leaves fewer than ~4 tiles per core on a GEMV
        if n % (lanes * vecs) == 0 and n // (lanes * vecs) >= 4 * cores:
            nr = lanes * vecs
            break
    if n % nr:
        nr = n if n <= 4 * lanes else lanes
    mr = min(int(m), 4) if isinstance(m, int) else 1
    return mr, nr


def _tile_inner(sch, inner, j_factor: int, i0, c0, i1, c1):
    """Schedule one register tile: the reduction split by `j_factor` and unrolled outside the tile's rows
    and columns (columns vectorized), tiles in parallel, the write-back unrolled over rows and vectorized.
    Returns the outer reduction loop (where the caller decomposes the init)."""
    *spatial, red = inner
    jo, ji = sch.split(red, [None, j_factor])
    sch.reorder(jo, ji, *spatial)
    sch.unroll(ji)
    if len(spatial) == 2:
        sch.unroll(spatial[0])
    sch.vectorize(spatial[-1])
    sch.parallel(sch.fuse(i0, c0))
    sch.unroll(i1)
    sch.vectorize(c1)
    return jo


def schedule_quantized(func: tirx.PrimFunc, m, k: int, n: int, scheme: QuantScheme,
                       target: tvm.target.Target | None) -> tirx.PrimFunc:
    """Apply the CPU schedule described in the module docstring."""
    mr, nr = choose_tiles(m, n, target)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    if panel_rows(m):
        _schedule_panel(sch, 4 if m % 4 == 0 else 1, nr)
        return sch.mod["main"]
    y = sch.get_sblock("y")
    part = sch.get_sblock("part")
    if scheme.dot_layout:
        # part is the int32 accumulator; y the float epilogue
        i, c = sch.get_loops(y)
        i0, i1 = sch.split(i, [None, mr])
        c0, c1 = sch.split(c, [None, nr])
        sch.reorder(i0, c0, i1, c1)
        sch.compute_at(part, c0)
        sch.set_scope(part, 0, "local")
        jo = _tile_inner(sch, sch.get_loops(part)[2:], 4, i0, c0, i1, c1)
        init = sch.decompose_reduction(part, jo)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch.mod["main"]

    acc = sch.cache_write(y, 0, "local")
    i, c, g = sch.get_loops(y)
    i0, i1 = sch.split(i, [None, mr])
    c0, c1 = sch.split(c, [None, nr])
    sch.reorder(i0, c0, g, i1, c1)
    sch.reverse_compute_at(acc, c0)
    sch.compute_at(part, g)
    sch.set_scope(part, 0, "local")
    inner = sch.get_loops(part)[3:]  # below i0, c0, g: the tile's (rows,) columns, then j
    jo = _tile_inner(sch, inner, min(scheme.group_for(k), 32), i0, c0, i1, c1)
    sch.vectorize(sch.get_loops(acc)[-1])
    pinit = sch.decompose_reduction(part, jo)
    sch.vectorize(sch.get_loops(pinit)[-1])
    init = sch.decompose_reduction(y, g)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


#: from this many rows on, the weight is decoded once per column panel instead of once per row tile
PANEL_MIN_ROWS = 8


def panel_rows(m) -> bool:
    return isinstance(m, int) and m >= PANEL_MIN_ROWS


def _schedule_panel(sch: s_tir.Schedule, mr: int, nr: int) -> None:
    """Column panels in parallel; per panel the [K, nr] float weights decoded once (L2-resident), then
    register tiles of mr x nr outputs accumulated over all of K (GEMM with a packed B panel)."""
    y = sch.get_sblock("y")
    wf = sch.get_sblock("wf")
    i, c, r = sch.get_loops(y)
    i0, i1 = sch.split(i, [None, mr])
    c0, c1 = sch.split(c, [None, nr])
    sch.reorder(c0, i0, r, i1, c1)
    acc = sch.cache_write(y, 0, "local")
    sch.reverse_compute_at(acc, i0)
    sch.compute_at(wf, c0)
    sch.vectorize(sch.get_loops(wf)[-1])
    sch.parallel(c0)
    sch.unroll(i1)
    sch.vectorize(c1)
    sch.vectorize(sch.get_loops(acc)[-1])
    init = sch.decompose_reduction(y, r)
    sch.vectorize(sch.get_loops(init)[-1])
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))} \
        if _has_root(sch) else set()
    for grid in ("xfq", "xg"):  # a8: the activations' int8 grid (w8a8 per row, 4-bit a8 per group), rows in parallel
        if grid in names:
            sch.compute_inline(sch.get_sblock("sx"))
            sch.parallel(sch.get_loops(sch.get_sblock("amax"))[0])
            xi, xc = sch.get_loops(sch.get_sblock(grid))
            sch.parallel(xi)
            _, xv = sch.split(xc, [None, 16])
            sch.vectorize(xv)


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def quantized_matmul_primfunc(m, k: int, n: int, scheme: QuantScheme, target: tvm.target.Target | None = None,
                              x_dtype: str = "float32", schedule: bool = True) -> tuple[tirx.PrimFunc, bool]:
    """The kernel as a PrimFunc (scheduled for `target` when possible) and whether the schedule applied.

    w8a8 on a CPU with int8 dot products (AVX-512 VNNI, Arm dotprod, Arm i8mm) and a float32 input: the hand-written
    kernel of `edgecc.schedules.int8_dot` (2.5-5x the generic one)."""
    if schedule and scheme.act_bits == 8 and scheme.bits == 4 and x_dtype == "float32" and not panel_rows(m):
        from edgecc.schedules import int4_dot

        isa = int4_dot.target_isa(target)
        tile = scheme.stored_shapes(k, n)["scales"][0][2]
        if int4_dot.supports(isa, scheme.bits, scheme.group_for(k), k, n, tile):
            return int4_dot.int4_dot_matmul_kernel(k, n, scheme.group_for(k), tile, isa, scheme.symmetric,
                                                   rows=m, cores=_num_cores(target)), True
    if schedule and scheme.act_bits == 0 and scheme.bits == 4 and x_dtype == "float32":
        from edgecc.schedules import int4_float  # decode GEMV (m <= 4): no int->float convert, prefetch

        lanes = int4_float.target_lanes(target)
        tile = scheme.stored_shapes(k, n)["scales"][0][2]
        if int4_float.enabled(lanes) and int4_float.supports(lanes, scheme.bits, scheme.group_for(k), k, n, tile, m):
            return int4_float.int4_float_matmul_kernel(m, k, n, scheme.group_for(k), tile, lanes[0], scheme.symmetric,
                                                       lanes[1], cores=_num_cores(target),
                                                       paired=int4_float.has_pair_decode(target)), True
    if schedule and scheme.dot_layout and x_dtype == "float32":
        from edgecc.schedules import int8_dot

        isa = int8_dot.target_int8_isa(target)  # i8mm (smmla) first, then VNNI / sdot
        tile = scheme.stored_shapes(k, n)["scales"][0][2]
        if int8_dot.supports(isa, n, tile):
            return int8_dot.int8_dot_matmul_kernel(k, n, tile, isa, rows=m), True
    func = te.create_prim_func(quantized_matmul_compute(m, k, n, scheme, x_dtype)).without_attr("global_symbol")
    if not schedule:
        return func, False
    try:
        return schedule_quantized(func, m, k, n, scheme, target), True
    except Exception as exc:  # noqa: BLE001 - a schedule bug costs speed, not the build
        log.warning("quantized matmul schedule failed for %sx%sx%s %s: %s", m, k, n, scheme.name,
                    str(exc).strip().splitlines()[-1][:200])
        return func, False


# ------------------------------------------------------------------------------------------ gather


def quantized_gather_compute(m, d: int, v: int, scheme: QuantScheme, idx_dtype: str = "int64",
                             out_dtype: str = "float32"):
    """TE tensors for rows `idx` of a quantized [V, D] table stored as the [K = D, N = V] right operand of
    `x @ table^T` (tile-major): out[i, c] = scale[c // G, row] * (code[c, row] - zero[c // G, row]).
    Only the gathered rows are decoded; negative indices count from the end (ONNX Gather)."""
    g_size = scheme.group_for(d)
    bits = scheme.bits
    shapes = scheme.stored_shapes(d, v)
    tile = shapes["scales"][0][2]
    idx = te.placeholder((m,), idx_dtype, name="indices")
    w = te.placeholder(shapes["weight"][0], shapes["weight"][1], name="qweight")
    s = te.placeholder(shapes["scales"][0], shapes["scales"][1], name="scales")
    z = te.placeholder(shapes["zeros"][0], "uint8", name="zeros") if "zeros" in shapes else None
    last_word = shapes["weight"][0][1] - 1
    mask = tirx.const((1 << bits) - 1, "uint32")

    def at(buf, row, col):
        return buf[col // tile, row, col % tile]

    def value(i, c):
        r = idx[i].astype("int64")
        r = tirx.max(tirx.min(tirx.Select(r < 0, r + v, r), tirx.const(v - 1, "int64")), tirx.const(0, "int64"))
        g = c // g_size
        if bits == 8:
            code = at(w, c, r).astype("float32")
        else:
            pos = c * bits
            word, shift = pos // 32, (pos % 32).astype("uint32")
            val = at(w, word, r) >> shift
            if 32 % bits:  # a code may straddle two words
                nxt = at(w, tirx.min(word + 1, last_word), r) << (tirx.const(32, "uint32") - shift)
                val = tirx.if_then_else(pos % 32 + bits > 32, val | nxt, val)
            code = (val & mask).astype("float32")
        if z is not None:
            code = code - at(z, g, r).astype("float32")
        elif scheme.zero_offset:
            code = code - tirx.const(float(scheme.zero_offset), "float32")
        return (at(s, g, r).astype("float32") * code).astype(out_dtype)

    out = te.compute((m, d), value, name="rows")
    return [idx, w, s] + ([z] if z is not None else []) + [out]


def quantized_gather_primfunc(m, d: int, v: int, scheme: QuantScheme, idx_dtype: str = "int64",
                              out_dtype: str = "float32") -> tuple[tirx.PrimFunc, bool]:
    """The gather kernel as a PrimFunc, rows in parallel (each row decodes D codes), and whether the
    schedule applied."""
    func = te.create_prim_func(quantized_gather_compute(m, d, v, scheme, idx_dtype, out_dtype))
    func = func.without_attr("global_symbol")
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        i, _ = sch.get_loops(sch.get_sblock("rows"))
        sch.parallel(i)
        return sch.mod["main"], True
    except Exception as exc:  # noqa: BLE001 - a schedule bug costs speed, not the build
        log.warning("quantized gather schedule failed for %sx%s %s: %s", m, d, scheme.name, exc)
        return func, False
