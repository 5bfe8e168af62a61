"""Replace attention subgraphs with one fused kernel (`edgecc.schedules.attention.prefill_attention_kernel`).

ONNX exports spell attention as separate ops: two matmuls, a scale, a mask add, a softmax, and transposes
between the [batch, seq, heads, head_dim] projections and the [batch, heads, seq, head_dim] matmuls. Unfused,
the scores [heads, S, Sk] are written and read four times and every transpose is a copy. This pass finds

    o = matmul(softmax(matmul(q, k^T) * c [+ mask], axis=-1), v)

before legalization and replaces it with one `call_tir` of the fused kernel, reading q/k/v and writing the
output in whichever layout the graph has them before its transposes (which then die):

    before:  qt = permute_dims(q, [0,2,1,3]); kt = permute_dims(k, [0,2,3,1]); vt = permute_dims(v, [0,2,1,3])
             p = softmax(matmul(qt, kt) * c + mask); o = permute_dims(matmul(p, vt), [0,2,1,3])
    after:   o = call_tir(prefill_attention, (q, k, v[, mask]))       # [batch, seq, heads, head_dim]

Recognised variants: ``k^T`` as permute_dims of [B, Sk, H, D] or of [B, H, Sk, D]; the scale as multiply or
divide by a scalar constant (or none); the mask as an add of a constant causal mask (0 on and below the
diagonal, <= -1e30 above it: becomes the kernel's arithmetic causal test, nothing is read) or of any
additive tensor broadcasting as [1 | B, 1, 1 | S, Sk] (padding masks); grouped-query attention written as
query rows [B, kv_heads, G*S, D] with the mask added through a [B, kv_heads, G, S, Sk] reshape (the Llama
export, `edgecc.models.llama`), or as a single KV head broadcast over the query heads. Anything else
(dynamic shapes, other dtypes than float32, a score or probability tensor used elsewhere, per-head masks)
is left unfused. CPU targets only; the kernel's vector width comes from the target (`edgecc.schedules.params`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from edgecc.ir_passes.kv_cache import peel_scalar_scale
from edgecc.targets.registry import TargetSpec

#: a mask entry at or below this is "masked" when deciding whether a constant mask is causal
MASKED = -1e30


@dataclass
class Match:
    """One attention subgraph and how the kernel reads it."""

    replace: relax.Var  # the binding the kernel call takes over
    q: relax.Expr
    k: relax.Expr
    v: relax.Expr
    mask: relax.Expr | None
    layouts: tuple  # q, k, v, out: "bhsd" | "bshd"
    dims: tuple  # batch, kv_heads, group, seq, kv_seq, head_dim
    scale: float
    causal: bool
    mask_shape: tuple | None
    q_reshape: list | None = None  # reshape q to this first (a single KV head broadcast over query heads)
    out_shape: list | None = None  # reshape the kernel's output to this (the replaced binding's shape)


def _static(ty) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None or str(ty.dtype) != "float32":
        return None
    dims = list(ty.shape.values)
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _const_array(expr) -> np.ndarray | None:
    if isinstance(expr, relax.Var):
        return None
    data = getattr(expr, "value", None)
    if data is None:
        data = getattr(expr, "data", None)
    return data.numpy() if data is not None and hasattr(data, "numpy") else None


class _Graph:
    """Bindings and use counts of one function, for walking producers."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}
        self.uses: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.value[b.var] = b.value
                for v in _operands(b.value):
                    self.uses.setdefault(v, []).append(b.var)
        for v in _operands(func.body.body):
            self.uses.setdefault(v, []).append(None)

    def call(self, expr, op_name: str):
        value = self.value.get(expr) if isinstance(expr, relax.Var) else None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op_name:
            return value
        return None

    def only_use(self, var) -> relax.Var | None:
        uses = self.uses.get(var, [])
        return uses[0] if len(uses) == 1 else None


def _scalar_of(expr) -> float | None:
    arr = _const_array(expr)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _operands(expr) -> list:
    out = []
    if isinstance(expr, relax.Call):
        for a in expr.args:
            out.extend(_operands(a) if isinstance(a, relax.Tuple) else [a])
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            out.extend(_operands(f))
    elif isinstance(expr, relax.TupleGetItem):
        out.append(expr.tuple_value)
    elif isinstance(expr, relax.Var):
        out.append(expr)
    return [v for v in out if isinstance(v, relax.Var)]


def _is(a, b) -> bool:
    return a is not None and b is not None and a.same_as(b)


def _axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else []


def _causal(arr: np.ndarray, seq: int, kv_seq: int) -> bool:
    """A constant [.., S, Sk] mask that is 0 where key <= query + (Sk - S) and ~-inf elsewhere."""
    if arr.ndim < 2 or arr.shape[-2:] != (seq, kv_seq) or any(d != 1 for d in arr.shape[:-2]):
        return False
    m = arr.reshape(seq, kv_seq)
    allowed = np.arange(kv_seq)[None, :] <= np.arange(seq)[:, None] + (kv_seq - seq)
    return bool(np.all(m[allowed] == 0) and np.all(m[~allowed] <= MASKED))


def match_attention(g: _Graph, var: relax.Var) -> Match | None:
    """The attention subgraph ending at `var` = matmul(softmax(...), v), or None."""
    o = g.call(var, "relax.matmul")
    if o is None:
        return None
    probs, v = o.args
    softmax = g.call(probs, "relax.nn.softmax")
    o_shape = _static(var.ty)
    if softmax is None or o_shape is None or len(o_shape) != 4 or not _is(g.only_use(probs), var):
        return None
    x = softmax.args[0]
    x_shape = _static(x.ty)
    if x_shape is None or int(softmax.attrs.axis) not in (-1, 3):
        return None
    # ---- mask: add(y, mask), or reshape(add(reshape(y, 5-D), mask), 4-D) (grouped rows, Llama)
    mask, group5 = None, None
    outer = g.call(x, "relax.reshape")
    if outer is not None and _is(g.only_use(outer.args[0]), x):
        add = g.call(outer.args[0], "relax.add")
        inner = g.call(add.args[0], "relax.reshape") if add is not None else None
        shape5 = _static(add.args[0].ty) if add is not None else None
        if inner is None or shape5 is None or len(shape5) != 5 or not _is(g.only_use(add.args[0]), outer.args[0]):
            return None
        y, mask, group5 = inner.args[0], add.args[1], shape5[2]
        if _static(y.ty) != x_shape or not _is(g.only_use(y), add.args[0]):
            return None
    else:
        add = g.call(x, "relax.add")
        y = x
        if add is not None:
            y, mask = add.args
            if not _is(g.only_use(y), x):
                return None
    # ---- scale
    peeled = peel_scalar_scale(y, g.call, _scalar_of, keep=lambda a, y=y: _is(g.only_use(a), y))
    if peeled is None:
        return None
    scale, y = peeled
    scores = g.call(y, "relax.matmul")
    if scores is None:
        return None
    q, kt = scores.args
    # ---- k^T
    perm = g.call(kt, "relax.permute_dims")
    if perm is None:
        return None
    k, axes = perm.args[0], _axes(perm)
    k_layout = {(0, 2, 3, 1): "bshd", (0, 1, 3, 2): "bhsd"}.get(tuple(axes))
    k_shape = _static(k.ty)
    q_shape = _static(q.ty)
    if k_layout is None or k_shape is None or q_shape is None or len(q_shape) != 4:
        return None
    batch, kv_seq, kv_heads, head_dim = k_shape if k_layout == "bshd" else (k_shape[0], k_shape[2], k_shape[1],
                                                                            k_shape[3])
    if q_shape[0] != batch or q_shape[3] != head_dim or o_shape[3] != head_dim:
        return None
    # ---- q: [B, Hq', R, D]; Hq' == kv_heads (rows may stack G heads) or kv_heads == 1 (broadcast)
    hq, rows = q_shape[1], q_shape[2]
    q_reshape = None
    if hq == kv_heads:
        group = group5 or 1
        if rows % group:
            return None
    elif kv_heads == 1 and group5 is None:
        group = hq
        q_reshape = [batch, 1, hq * rows, head_dim]
        rows = hq * rows
    else:
        return None
    seq = rows // group
    q_layout = "bhsd"
    qp = g.call(q, "relax.permute_dims")
    if q_reshape is None and group == 1 and qp is not None and _axes(qp) == [0, 2, 1, 3] \
            and _static(qp.args[0].ty) is not None:
        q, q_layout = qp.args[0], "bshd"
    # ---- v
    v_layout = "bhsd"
    vp = g.call(v, "relax.permute_dims")
    if vp is not None and _axes(vp) == [0, 2, 1, 3] and _static(vp.args[0].ty) is not None:
        v, v_layout = vp.args[0], "bshd"
    v_shape = _static(v.ty)
    want_v = [batch, kv_seq, kv_heads, head_dim] if v_layout == "bshd" else [batch, kv_heads, kv_seq, head_dim]
    if v_shape != want_v:
        return None
    # ---- mask
    causal, mask_shape = False, None
    if mask is not None:
        arr = _const_array(mask)
        m_shape = _static(mask.ty)
        if arr is not None and _causal(arr.astype(np.float64), seq, kv_seq):
            mask, causal = None, True
        elif m_shape is None or len(m_shape) > 4 or m_shape[-1] != kv_seq:
            return None
        else:
            full = [1] * (4 - len(m_shape)) + m_shape if group5 is None else [1, 1] + m_shape[-2:]
            if group5 is not None and any(d != 1 for d in m_shape[:-2]):
                return None
            if full[0] not in (1, batch) or full[1] != 1 or full[2] not in (1, seq):
                return None
            mask_shape = tuple(full)
    # ---- output: keep [B, Hk, G*S, D], or write [B, S, H, D] when the graph transposes it there
    replace, out_layout, out_shape = var, "bhsd", None
    if q_reshape is not None:
        out_shape = o_shape
    nxt = g.only_use(var)
    if nxt is not None and q_reshape is None:
        r = g.call(nxt, "relax.reshape")
        if r is not None and _static(nxt.ty) == [batch, kv_heads * group, seq, head_dim]:
            nxt2 = g.only_use(nxt)
        else:
            nxt2 = nxt if group == 1 else None
        tp = g.call(nxt2, "relax.permute_dims") if nxt2 is not None else None
        if tp is not None and _axes(tp) == [0, 2, 1, 3]:
            replace, out_layout = nxt2, "bshd"
    return Match(replace, q, k, v, mask, (q_layout, k_layout, v_layout, out_layout),
                 (batch, kv_heads, group, seq, kv_seq, head_dim), scale, causal, mask_shape, q_reshape, out_shape)


def _kernel(m: Match, spec: TargetSpec) -> tirx.PrimFunc:
    from edgecc.schedules.attention import prefill_attention_kernel
    from edgecc.schedules.params import cpu_params

    p = cpu_params(spec)
    q_l, k_l, v_l, o_l = m.layouts
    return prefill_attention_kernel(*m.dims, m.scale, m.causal, lanes=p.lanes(32), vector_regs=p.vector_regs,
                                    num_cores=p.num_cores, mask_shape=m.mask_shape, q_layout=q_l, k_layout=k_l,
                                    v_layout=v_l, out_layout=o_l)


def _mutator_class():
    @relax.expr_functor.mutator
    class _Fuser(relax.PyExprMutator):
        def __init__(self, mod, spec, matches):
            super().__init__(mod)
            self.spec, self.matches = spec, matches
            self.kernels: dict = {}

        def visit_var_binding_(self, binding):  # noqa: N802 - TVM visitor name
            m = self.matches.get(binding.var)
            if m is None:
                return super().visit_var_binding_(binding)
            key = (m.dims, round(m.scale, 12), m.causal, m.mask_shape, m.layouts)
            if key not in self.kernels:
                self.kernels[key] = self.builder_.add_func(_kernel(m, self.spec), "prefill_attention")
            q = self.visit_expr(m.q)
            if m.q_reshape is not None:
                q = self.builder_.emit(relax.op.reshape(q, m.q_reshape))
            args = [q, self.visit_expr(m.k), self.visit_expr(m.v)]
            if m.mask is not None:
                mask = self.visit_expr(m.mask)
                if _static(m.mask.ty) != list(m.mask_shape):  # [S, Sk], [1, 1, S, Sk] ... -> 4-D
                    mask = self.builder_.emit(relax.op.reshape(mask, list(m.mask_shape)))
                args.append(mask)
            b, hk, g, s, _, d = m.dims
            shape = [b, hk, g * s, d] if m.layouts[3] == "bhsd" else [b, s, hk * g, d]
            out = self.builder_.emit(relax.call_tir(self.kernels[key], args, relax.TensorType(shape, "float32")))
            if m.out_shape is not None:
                out = self.builder_.emit(relax.op.reshape(out, m.out_shape))
            self.set_var_remap(binding.var, out)

    return _Fuser


def fuse_attention(mod: tvm.IRModule, spec: TargetSpec) -> tuple[tvm.IRModule, int]:
    """(module with every recognised attention fused, how many were fused)."""
    names = []
    total = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        names.append(gv.name_hint)
        g = _Graph(func)
        matches = {}
        for var in list(g.value):
            m = match_attention(g, var)
            if m is not None:
                matches[m.replace] = m
        if not matches:
            continue
        fuser = _mutator_class()(mod, spec, matches)
        new_func = fuser.visit_expr(func)
        mod = fuser.builder_.get()
        mod[gv] = new_func
        total += len(matches)
    if total:
        mod = relax.transform.DeadCodeElimination(names)(mod)
    return mod, total


def applies_to(spec: TargetSpec) -> bool:
    """CPU targets except riscv64: there the kernel crashes qemu-riscv64 7.2 (a decode_save_opc assertion),
    so it is unverified; riscv64 keeps the unfused matmul/softmax kernels."""
    return spec.device == "cpu" and spec.arch != "riscv64"


def fuse_attention_pass(spec: TargetSpec) -> tvm.transform.Pass:
    """The pass form, for `edgecc.ir_passes.pipeline` (CPU targets with default schedules)."""

    @tvm.transform.module_pass(opt_level=0, name="edgecc.FuseAttention")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return fuse_attention(mod, spec)[0]

    return _pass
