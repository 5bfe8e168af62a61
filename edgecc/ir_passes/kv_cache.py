"""Rewrite a decoder's concat-grown KV cache into a preallocated cache updated in place.

ONNX exports of decoders take the past keys/values as inputs ``[1, kv_heads, past_len, head_dim]`` and return
``Concat(past, new)`` along the sequence axis: every token copies the whole cache into a fresh, larger
tensor. After the rewrite a function instead takes, per cache tensor, a buffer preallocated for
``max_context`` positions, plus the write position as a shape argument ``R.Shape([past_len])``:

    before:  present = R.concat((past_key_0, k_new), axis=2)             # [1, H, past_len + s, D], new allocation
    after:   cache' = R.call_tir_inplace(kv_write, (cache_key_0, k_new, past_len), [0])   # aliases cache_key_0
             view   = R.call_tir(kv_view, (cache', past_len))            # rows 0..past_len+s-1, compact copy

and, for one-token decode steps, the attention that reads the two views (``softmax(q @ permute(view_k) * c)
@ view_v``) becomes one ``decode_attention`` kernel over the caches themselves
(`edgecc.schedules.attention`); the views are then dead and removed. Attention shapes the matcher does not
recognise keep the views and run unchanged.

The function returns its other outputs followed by the updated caches (returning them keeps the in-place
calls alive through dead-code elimination; they alias the caller's buffers). A prefill graph, whose presents
are the new keys/values themselves, gets ``kv_write`` calls that store them at rows ``start..``; its attention
becomes the fused prefill kernel in the build pipeline (`edgecc.ir_passes.fuse_attention`).

Which inputs are caches is found by pattern, not by name: a 4-D non-weight input whose only use is the first
operand of a ``concat`` along a symbolic axis, whose result is one of the function's outputs. ``--kv-cache``
names them explicitly; they must still match the pattern (we have to know where the new rows come from).

The memory planner needs upper bounds for the symbolic lengths (``tir_var_upper_bound``): the activation
arena then has a fixed size, and the cache a fixed ``max_context``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx

from edgecc.errors import EdgeccError

CONCAT = "relax.concat"
OP_PATTERN_OPAQUE = 8


@dataclass(frozen=True)
class KVPair:
    """One cache tensor: the past input, the output it grows into, and its geometry."""

    input_index: int  # position among the function's params
    input_name: str
    output_index: int  # position in the function's output tuple
    axis: int  # sequence axis (2 for [1, H, T, D])
    shape: tuple  # the past input's shape, sequence dim symbolic
    dtype: str

    def cache_shape(self, max_context: int) -> list[int]:
        dims = [int(d) for i, d in enumerate(self.shape) if i != self.axis]
        dims.insert(self.axis, max_context)
        return dims


def _output_fields(func: relax.Function) -> list[relax.Expr]:
    """The expressions a function returns, through its final tuple binding."""
    body = func.body
    result = body.body
    bindings = {b.var: b.value for block in body.blocks for b in block.bindings}
    while isinstance(result, relax.Var) and result in bindings and not isinstance(result, relax.DataflowVar) \
            and isinstance(bindings[result], (relax.Tuple, relax.Var)):
        result = bindings[result]
    if isinstance(result, relax.Tuple):
        return [bindings.get(f, f) if isinstance(f, relax.Var) and isinstance(bindings.get(f), relax.Var) else f
                for f in result.fields]
    return [result]


def _uses(func: relax.Function) -> dict[relax.Var, list[relax.Expr]]:
    """var -> the binding values (calls/tuples) that reference it directly."""
    uses: dict = {}

    def add(var, value):
        uses.setdefault(var, []).append(value)

    for block in func.body.blocks:
        for b in block.bindings:
            value = b.value
            args = []
            if isinstance(value, relax.Call):
                for a in value.args:
                    args.extend(a.fields if isinstance(a, relax.Tuple) else [a])
            elif isinstance(value, relax.Tuple):
                args = list(value.fields)
            elif isinstance(value, relax.TupleGetItem):
                args = [value.tuple_value]
            elif isinstance(value, relax.Var):
                args = [value]
            for a in args:
                if isinstance(a, relax.Var):
                    add(a, value)
    return uses


def _concat_bindings(func: relax.Function) -> dict[relax.Var, relax.Call]:
    out = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == CONCAT:
                out[b.var] = v
    return out


def find_kv_pairs(func: relax.Function, input_names: list[str], names: list[str] | None = None) -> list[KVPair]:
    """The cache inputs of a decode function (see module docstring). `names`: the user's --kv-cache list."""
    num_input = int(func.attrs["num_input"])
    uses = _uses(func)
    concats = _concat_bindings(func)
    outputs = _output_fields(func)
    pairs: list[KVPair] = []
    problems: list[str] = []
    for i, param in enumerate(func.params[:num_input]):
        name = input_names[i]
        ty = param.ty
        if names is not None and name not in names:
            continue
        if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim != 4:
            if names is not None:
                problems.append(f"'{name}' is not a 4-D tensor")
            continue
        dims = list(ty.shape.values)
        symbolic = [a for a, d in enumerate(dims) if not isinstance(d, tirx.IntImm)]
        if len(symbolic) != 1:
            if names is not None:
                problems.append(f"'{name}' has no single symbolic (sequence) dim")
            continue
        axis = symbolic[0]
        use = uses.get(param, [])
        concat_var = next((var for var, call in concats.items() if any(u.same_as(call) for u in use)), None)
        if len(use) != 1 or concat_var is None:
            if names is not None:
                problems.append(f"'{name}' is used {len(use)} time(s), not once by a Concat")
            continue
        call = concats[concat_var]
        fields = call.args[0].fields if isinstance(call.args[0], relax.Tuple) else []
        if len(fields) != 2 or not fields[0].same_as(param) or int(call.attrs.axis) % 4 != axis:
            if names is not None:
                problems.append(f"'{name}' is not the first operand of a Concat along its sequence axis")
            continue
        out_index = next((j for j, f in enumerate(outputs) if isinstance(f, relax.Var) and f.same_as(concat_var)),
                         None)
        if out_index is None:
            if names is not None:
                problems.append(f"the Concat growing '{name}' is not a model output")
            continue
        pairs.append(KVPair(i, name, out_index, axis, tuple(dims), str(ty.dtype)))
    if problems:
        raise EdgeccError("--kv-cache input(s) do not follow the KV-cache pattern: " + "; ".join(problems),
                          "name inputs [batch, heads, past_len, head_dim] that are grown by a Concat into an output")
    if names is not None:
        missing = sorted(set(names) - {p.input_name for p in pairs})
        if missing:
            raise EdgeccError(f"--kv-cache names unknown input(s): {', '.join(missing)}",
                              "the model's inputs are: " + ", ".join(input_names))
    return pairs


def describe_inputs(func: relax.Function, input_names: list[str]) -> str:
    """For error messages: the inputs found, with their shapes."""
    num_input = int(func.attrs["num_input"])
    parts = []
    for name, p in zip(input_names, func.params[:num_input]):
        shape = list(p.ty.shape.values) if isinstance(p.ty, relax.TensorType) and p.ty.shape is not None else "?"
        parts.append(f"{name}{shape}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ kernels


#: bytes appended to each int8 cache row: the row's float32 scale (x = int8 * scale)
INT8_SCALE_BYTES = 4


def _geometry(shape: list[int], kv_dtype: str):
    """(batch, heads, max_len, head_dim, row) of a cache buffer; int8 rows carry their scale after head_dim."""
    b, h, max_len, row = shape
    head_dim = row - INT8_SCALE_BYTES if kv_dtype == "int8" else row
    return b, h, max_len, head_dim, row


def view_kernel(shape: list[int], axis: int, seq: int, dtype: str, kv_dtype: str = "float32") -> tirx.PrimFunc:
    """view = cache[.., :pos+seq, ..] as `dtype`, a compact copy (what the unfused attention reads)."""
    from tvm.script import tirx as T

    assert axis == 2, "caches are [batch, heads, T, head_dim]"
    b, h, max_len, d, row = (T.int64(v) for v in _geometry(shape, kv_dtype))
    s = T.int64(seq)
    int8 = kv_dtype == "int8"
    dq = T.int64(int(d) // 4)

    @T.prim_func(private=True)
    def kv_view(cache_h: T.handle, pos: T.int64, view_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE})
        cache = T.match_buffer(cache_h, (b, h, max_len, row), kv_dtype)
        view = T.match_buffer(view_h, (b, h, pos + s, d), dtype)
        for bh in T.parallel(b * h):
            for t in range(pos + s):
                if int8:
                    rows = T.decl_buffer((b, h, max_len, row // T.int64(4)), "float32", data=cache.data)
                    for j in T.vectorized(d):
                        view[bh // h, bh % h, t, j] = T.Cast(dtype, cache[bh // h, bh % h, t, j]) * rows[
                            bh // h, bh % h, t, dq]
                else:
                    for j in T.vectorized(d):
                        view[bh // h, bh % h, t, j] = cache[bh // h, bh % h, t, j]

    return kv_view


def write_kernel(shape: list[int], axis: int, seq: int, dtype: str, kv_dtype: str = "float32") -> tirx.PrimFunc:
    """cache[.., pos:pos+seq, ..] = new (int8 caches: each row quantized with its own absmax scale)."""
    from tvm.script import tirx as T

    assert axis == 2, "caches are [batch, heads, T, head_dim]"
    b, h, max_len, d, row = (T.int64(v) for v in _geometry(shape, kv_dtype))
    s = T.int64(seq)
    int8 = kv_dtype == "int8"
    dq = T.int64(int(d) // 4)
    # One decode token is a few hundred values: waking the thread pool costs more than the copy.
    threaded = shape[0] * shape[1] * seq * shape[3] >= 8192

    @T.prim_func(private=True)
    def kv_write(cache_h: T.handle, new_h: T.handle, pos: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OP_PATTERN_OPAQUE})
        cache = T.match_buffer(cache_h, (b, h, max_len, row), kv_dtype)
        new = T.match_buffer(new_h, (b, h, s, d), dtype)
        for bh in T.parallel(b * h) if threaded else T.serial(b * h):
            for t in range(s):
                if int8:
                    rows = T.decl_buffer((b, h, max_len, row // T.int64(4)), "float32", data=cache.data)
                    amax = T.decl_buffer((1,), "float32", scope="local")
                    amax[0] = T.float32(0)
                    for j in range(d):
                        amax[0] = T.max(amax[0], T.abs(T.Cast("float32", new[bh // h, bh % h, t, j])))
                    rows[bh // h, bh % h, pos + t, dq] = T.Select(amax[0] > T.float32(0),
                                                                  amax[0] / T.float32(127), T.float32(1))
                    for j in T.vectorized(d):
                        cache[bh // h, bh % h, pos + t, j] = T.Cast("int8", T.round(
                            T.Cast("float32", new[bh // h, bh % h, t, j]) / rows[bh // h, bh % h, pos + t, dq]))
                else:
                    for j in T.vectorized(d):
                        cache[bh // h, bh % h, pos + t, j] = new[bh // h, bh % h, t, j]

    return kv_write


# ------------------------------------------------------------------------------------------ rewrites


@dataclass(frozen=True)
class CacheLayout:
    """The caches every entry point shares, in argument order."""

    names: list[str]  # e.g. cache_key_0, cache_value_0, ...
    shapes: list[list[int]]  # as stored: int8 rows are head_dim + INT8_SCALE_BYTES long
    dtype: str  # what the model computes in (the past inputs' dtype)
    axis: int
    max_context: int
    kv_dtype: str = "float32"  # what the cache stores: the compute dtype, or "int8" (+ a scale per row)

    def nbytes(self) -> int:
        item = tvm.runtime.DataType(self.kv_dtype).bits // 8
        total = 0
        for shape in self.shapes:
            n = 1
            for v in shape:
                n *= v
            total += n * item
        return total

    def bytes_per_token(self) -> int:
        return self.nbytes() // self.max_context

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtype": self.kv_dtype,
                "compute_dtype": self.dtype,
                "axis": self.axis, "max_context": self.max_context, "bytes_per_token": self.bytes_per_token(),
                "bytes": self.nbytes()}


def cache_layout(pairs: list[KVPair], max_context: int, kv_dtype: str | None = None) -> CacheLayout:
    names = [p.input_name.replace("past", "cache", 1) if "past" in p.input_name else f"cache_{p.input_name}"
             for p in pairs]
    dtypes = {p.dtype for p in pairs}
    if len(dtypes) != 1:
        raise EdgeccError(f"KV-cache inputs have mixed dtypes {sorted(dtypes)}", "export the caches in one dtype")
    dtype = dtypes.pop()
    kv_dtype = kv_dtype or dtype
    if kv_dtype not in (dtype, "int8"):
        raise EdgeccError(f"--kv-dtype {kv_dtype} is not supported for a {dtype} model", f"use {dtype} or int8")
    shapes = [p.cache_shape(max_context) for p in pairs]
    if kv_dtype == "int8":
        if any(sh[-1] % 4 for sh in shapes):
            raise EdgeccError("--kv-dtype int8 needs head_dim divisible by 4", "use --kv-dtype float32")
        shapes = [sh[:-1] + [sh[-1] + INT8_SCALE_BYTES] for sh in shapes]
    return CacheLayout(names, shapes, dtype, pairs[0].axis, max_context, kv_dtype)


def _replace_function(func: relax.Function, new_inputs: list[relax.Var], body: relax.Expr,
                      bounds: dict[str, int]) -> relax.Function:
    num_input = int(func.attrs["num_input"])
    params = new_inputs + list(func.params[num_input:])
    out = relax.Function(params, body, None, func.is_pure, func.attrs, func.span)
    out = out.with_attr("num_input", len(new_inputs))
    return out.with_attr("tir_var_upper_bound", {k: tvm.tirx.IntImm("int64", v) for k, v in bounds.items()})


def _result_var(func: relax.Function) -> relax.Var | None:
    result = func.body.body
    return result if isinstance(result, relax.Var) else None


def peel_scalar_scale(y, find_call, scalar_of, keep=lambda operand: True) -> tuple[float, object] | None:
    """Attention's score scaling: (c, a) when `y` is `a * c` / `c * a` / `a / c` (as (1/c, a)) with a nonzero
    scalar constant c, (1.0, y) when it is neither, None when it is but cannot be used (c not a nonzero
    scalar, or `keep(a)` refuses). `find_call(expr, op_name)` finds the producing call, `scalar_of` reads
    a constant's value (both differ between the KV-cache rewrite and the attention fusion)."""
    for op_name in ("relax.multiply", "relax.divide"):
        call = find_call(y, op_name)
        if call is None:
            continue
        a, b = call.args
        c = scalar_of(b)
        if c is None and op_name == "relax.multiply":
            c, a = scalar_of(a), b
        if c is None or c == 0 or not keep(a):
            return None
        return (c if op_name == "relax.multiply" else 1.0 / c), a
    return 1.0, y


def _scalar_constant(expr) -> float | None:
    """The value of a scalar (or one-element) constant, else None."""
    data = getattr(expr, "value", None) if not isinstance(expr, relax.Var) else None
    if data is None:
        data = getattr(expr, "data", None)
    if data is None or not hasattr(data, "numpy"):
        return None
    arr = data.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _rewriter_class():
    @relax.expr_functor.mutator
    class _KVRewriter(relax.PyExprMutator):
        """Replaces concat growth (decode) or adds cache writes (prefill); rebuilds the output tuple."""

        def __init__(self, mod, func, layout, caches, pos, seq, grow_by_param, write_outputs, dropped,
                     fuse_attention=True):
            super().__init__(mod)
            self.func, self.layout, self.caches, self.pos, self.seq = func, layout, caches, pos, seq
            self.grow_by_param = grow_by_param  # decode: past param -> cache index
            self.write_outputs = write_outputs  # prefill: output index -> cache index
            self.dropped = dropped
            self.updated: dict[int, relax.Expr] = {}
            self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
            self.result = _result_var(func)
            self.fuse_attention = fuse_attention
            self.fused = 0

        # ---- decode attention: softmax(q @ permute(view_k) * c) @ view_v -> one kernel over the caches
        def _bound(self, expr):
            if isinstance(expr, relax.Var):
                try:
                    return self.lookup_binding(expr)
                except Exception:  # noqa: BLE001 - not bound in this function (a parameter)
                    return None
            return None

        def _call(self, expr, op_name):
            value = self._bound(expr)
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op_name:
                return value
            return None

        def _view_source(self, expr):
            """The updated cache a kv_view call reads, if `expr` is one."""
            value = self._call(expr, "relax.call_tir")
            views = {gv for key, gv in self.kernels.items() if key[0] == "view"}
            if value is None or not any(value.args[0].same_as(gv) for gv in views):
                return None
            return value.args[1].fields[0]

        def _fused_attention(self, value, out_ty):
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name == "relax.matmul" and len(value.args) == 2):
                return None
            probs, v_view = value.args
            cache_v = self._view_source(v_view)
            softmax = self._call(probs, "relax.nn.softmax")
            if cache_v is None or softmax is None or int(softmax.attrs.axis) not in (-1, 3):
                return None
            peeled = peel_scalar_scale(softmax.args[0], self._call, _scalar_constant)
            if peeled is None:
                return None
            scale, scaled = peeled
            scores = self._call(scaled, "relax.matmul")
            if scores is None:
                return None
            q, kt = scores.args
            perm = self._call(kt, "relax.permute_dims")
            if perm is None or [int(a) for a in perm.attrs.axes] != [0, 1, 3, 2]:
                return None
            cache_k = self._view_source(perm.args[0])
            qt = q.ty
            if cache_k is None or not isinstance(qt, relax.TensorType) or qt.ndim != 4 \
                    or not all(isinstance(d, tirx.IntImm) for d in qt.shape.values):
                return None
            _, heads, rows, head_dim = (int(d) for d in qt.shape.values)
            shape = [int(d) for d in cache_k.ty.shape.values]
            stored_dim = head_dim + (INT8_SCALE_BYTES if self.layout.kv_dtype == "int8" else 0)
            if shape[1] != heads or shape[3] != stored_dim or str(qt.dtype) != self.layout.dtype:
                return None
            from edgecc.schedules.attention import decode_attention_kernel

            key = ("attention", heads, rows, head_dim, round(scale, 12))
            if key not in self.kernels:
                kernel = decode_attention_kernel(heads, rows, head_dim, shape[2], scale, self.layout.dtype,
                                                 self.layout.kv_dtype)
                self.kernels[key] = self.builder_.add_func(kernel, "decode_attention")
            return relax.call_tir(self.kernels[key], [q, cache_k, cache_v, relax.prim_value(self.pos)], out_ty)

        def _kernel(self, kind, k):
            key = (kind, tuple(self.layout.shapes[k]), self.seq)
            if key not in self.kernels:
                make = view_kernel if kind == "view" else write_kernel
                role = "decode" if self.grow_by_param else "prefill"  # unique names across the merged module
                self.kernels[key] = self.builder_.add_func(
                    make(self.layout.shapes[k], self.layout.axis, self.seq, self.layout.dtype, self.layout.kv_dtype),
                    f"{role}_kv_{kind}")
            return self.kernels[key]

        def visit_var_binding_(self, binding):  # noqa: N802 - TVM visitor name
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == CONCAT:
                fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else []
                if len(fields) == 2 and fields[0] in self.grow_by_param:
                    k = self.grow_by_param[fields[0]]
                    new = self.visit_expr(fields[1])
                    pos = relax.prim_value(self.pos)
                    write = relax.call_tir_inplace(self._kernel("write", k), [self.caches[k], new, pos], [0],
                                                   self.caches[k].ty)
                    self.updated[k] = self.builder_.emit(write)
                    view = relax.call_tir(self._kernel("view", k), [self.updated[k], pos], binding.var.ty)
                    self.set_var_remap(binding.var, self.builder_.emit(view))
                    return
            if self.fuse_attention and self.seq == 1:
                new_value = self.visit_expr(value)
                fused = self._fused_attention(new_value, binding.var.ty)
                if fused is not None:
                    self.set_var_remap(binding.var, self.builder_.emit(fused))
                    self.fused += 1
                    return
            if self.result is not None and binding.var.same_as(self.result) and isinstance(value, relax.Tuple):
                fields = [self.visit_expr(f) for f in value.fields]
                for j, k in self.write_outputs.items():
                    call = relax.call_tir_inplace(self._kernel("write", k),
                                                  [self.caches[k], fields[j], relax.prim_value(self.pos)],
                                                  [0], self.caches[k].ty)
                    self.updated[k] = self.builder_.emit(call)
                kept = [f for j, f in enumerate(fields) if j not in self.dropped]
                outs = kept + [self.updated[k] for k in range(len(self.caches))]
                self.set_var_remap(binding.var, self.builder_.emit_output(relax.Tuple(outs)))
                return
            super().visit_var_binding_(binding)

    return _KVRewriter


def _rewrite(mod: tvm.IRModule, func_name: str, layout: CacheLayout, seq: int, pos_var, removed_params,
             grow_by_param, write_outputs, dropped, fuse_attention: bool = True) -> tvm.IRModule:
    func = mod[func_name]
    num_input = int(func.attrs["num_input"])
    result = _result_var(func)
    bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    if result is None or not isinstance(bindings.get(result), relax.Tuple):
        raise EdgeccError(f"the decoder's '{func_name}' graph does not return a tuple of outputs",
                          "export the model with its present key/value outputs")
    caches = [relax.Var(n, relax.TensorType(s, layout.kv_dtype)) for n, s in zip(layout.names, layout.shapes)]
    pos_param = relax.Var("kv_position", relax.ShapeType([pos_var]))
    rewriter = _rewriter_class()(mod, func, layout, caches, pos_var, seq, grow_by_param, write_outputs, dropped,
                                 fuse_attention)
    body = rewriter.visit_expr(func.body)
    if len(rewriter.updated) != len(caches):
        raise EdgeccError(f"only {len(rewriter.updated)} of {len(caches)} KV caches were rewritten in '{func_name}'",
                          "check that every present output comes from a Concat of its past input")
    new_inputs = [p for p in func.params[:num_input] if p not in removed_params] + caches + [pos_param]
    new_mod = rewriter.builder_.get()
    new_mod[func_name] = _replace_function(func, new_inputs, body, {pos_var.name: layout.max_context - seq})
    return relax.transform.DeadCodeElimination([func_name])(new_mod)


def rewrite_decode(mod: tvm.IRModule, func_name: str, pairs: list[KVPair], layout: CacheLayout,
                   seq: int, fuse_attention: bool = True) -> tuple[tvm.IRModule, list[int]]:
    """Concat growth -> in-place append (see module docstring); with `fuse_attention` (one-token steps),
    softmax(q @ K^T * c) @ V over the cache becomes one `decode_attention` kernel reading the cache in place.

    Returns (module, indices of the original outputs kept, in order, before the caches).
    """
    func = mod[func_name]
    pos_var = pairs[0].shape[pairs[0].axis]
    if not isinstance(pos_var, tirx.Var) or any(not p.shape[p.axis].same_as(pos_var) for p in pairs):
        raise EdgeccError("KV-cache inputs disagree on their past-length dim",
                          "export every past key/value with the same symbolic length name")
    params = {func.params[p.input_index]: k for k, p in enumerate(pairs)}
    dropped = {p.output_index for p in pairs}
    new_mod = _rewrite(mod, func_name, layout, seq, pos_var, set(params), params, {}, dropped, fuse_attention)
    kept = [j for j in range(len(_output_fields(func))) if j not in dropped]
    return new_mod, kept


def rewrite_prefill(mod: tvm.IRModule, func_name: str, present_outputs: list[int], layout: CacheLayout,
                    seq: int) -> tuple[tvm.IRModule, list[int]]:
    """Presents (the new keys/values) -> written into the caches at rows start..start+seq-1.

    The prefill attention itself reads the new keys/values, not the cache: `edgecc.ir_passes.fuse_attention`
    (in the build pipeline, with the target's vector width) turns it into one causal, grouped-query
    `prefill_attention` kernel per layer; `tests/test_attention.py` checks it matches after this rewrite.
    """
    func = mod[func_name]
    start = tirx.Var("kv_start", "int64")
    write = {j: k for k, j in enumerate(present_outputs)}
    new_mod = _rewrite(mod, func_name, layout, seq, start, set(), {}, write, set(present_outputs), False)
    kept = [j for j in range(len(_output_fields(func))) if j not in set(present_outputs)]
    return new_mod, kept


def match_prefill_presents(func: relax.Function, output_names: list[str], decode_outputs: list[str],
                           pairs: list[KVPair], seq: int) -> list[int]:
    """For each decode cache (in order), the prefill output holding its first `seq` rows.

    Matched by output name when the two graphs share names (the usual ``present_*``), else by order among
    outputs of the cache's shape with `seq` rows.
    """
    fields = _output_fields(func)
    types = [f.ty for f in fields]

    def fits(j, pair):
        ty = types[j]
        if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim != 4 or str(ty.dtype) != pair.dtype:
            return False
        dims = list(ty.shape.values)
        want = list(pair.shape)
        return all(isinstance(d, tirx.IntImm) for d in dims) and all(
            int(d) == (seq if a == pair.axis else int(want[a])) for a, d in enumerate(dims))

    found = []
    by_name = {n: j for j, n in enumerate(output_names)}
    for pair in pairs:
        name = decode_outputs[pair.output_index]
        j = by_name.get(name)
        found.append(j if j is not None and fits(j, pair) else None)
    if all(j is not None for j in found):
        return found
    candidates = [j for j in range(len(fields)) if any(fits(j, p) for p in pairs)]
    if len(candidates) != len(pairs) or not all(fits(j, p) for j, p in zip(candidates, pairs)):
        raise EdgeccError(f"the prefill graph's outputs do not match the decoder's {len(pairs)} KV caches "
                          f"(found {len(candidates)} outputs shaped like a cache of {seq} rows)",
                          "export prefill with one present key/value output per decoder cache, same order")
    return candidates
