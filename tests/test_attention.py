"""The fused prefill attention kernel and the pass that uses it (edgecc.schedules.attention,
edgecc.ir_passes.fuse_attention).

Kernel: numerics against numpy float64 on odd shapes (1, 7, 129 positions; head_dim 32/64; grouped-query
9 query / 3 KV heads; causal, padding and full additive masks; both tensor layouts). Pass: IR before -> after on
the three ways exports spell attention (GPT: transposed projections + constant causal mask; MiniLM: padding
mask input; Llama: grouped query rows with the mask added through a 5-D reshape), what it must leave alone,
and the compiled result against numpy. One arm-neon build runs under qemu (marked `cross`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from edgecc.ir_passes.fuse_attention import fuse_attention  # noqa: E402
from edgecc.ir_passes.pipeline import relax_pipeline  # noqa: E402
from edgecc.schedules.attention import PREFILL_SCHEDULE_NAME, prefill_attention_kernel  # noqa: E402
from edgecc.schedules.params import cpu_params  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402
from conftest import relax_op_names  # noqa: E402

R = relax.op
HOST = get_target("host")
NEG = np.finfo(np.float32).min


def reference(q, k, v, scale, causal=False, mask=None):
    """softmax(q k^T * scale + mask) v in float64; q [B, Hq, S, D], k/v [B, Hk, Sk, D] (Hq = G * Hk)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if mask is not None:
        s = s + mask
    if causal:
        seq, kv_seq = q.shape[2], k.shape[2]
        s = np.where(np.arange(kv_seq)[None, :] > np.arange(seq)[:, None] + kv_seq - seq, -np.inf, s)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) @ v


def _bshd(x):
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


KERNEL_CASES = {
    # name: batch, kv_heads, group, seq, kv_seq, head_dim, causal, mask, layouts (q, k, v, out)
    "seq1_decode_like": (1, 2, 1, 1, 33, 32, False, None, "bhsd bhsd bhsd bhsd"),
    "seq1_single_key": (1, 2, 1, 1, 1, 64, True, None, "bhsd bhsd bhsd bhsd"),
    "seq7_causal": (1, 1, 1, 7, 7, 64, True, None, "bshd bshd bshd bshd"),
    "seq129_gqa_9q_3kv_causal": (1, 3, 3, 129, 129, 64, True, None, "bhsd bhsd bhsd bhsd"),
    "seq129_padding_mask": (1, 4, 1, 129, 129, 32, False, "padding", "bshd bshd bshd bshd"),
    "gqa_causal_padding_mixed_layouts": (2, 3, 3, 7, 7, 32, True, "padding", "bshd bhsd bshd bhsd"),
    "causal_with_cached_prefix_full_mask": (1, 2, 2, 5, 19, 64, True, "full", "bhsd bshd bhsd bshd"),
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_prefill_kernel_matches_numpy(case):
    batch, hk, group, seq, kv_seq, d, causal, mask_kind, layouts = KERNEL_CASES[case]
    q_l, k_l, v_l, o_l = layouts.split()
    rng = np.random.default_rng(len(case))
    q = rng.standard_normal((batch, hk * group, seq, d)) * 2
    k = rng.standard_normal((batch, hk, kv_seq, d))
    v = rng.standard_normal((batch, hk, kv_seq, d))
    mask = None
    if mask_kind == "padding":  # the last third of the keys are padding, per batch row
        mask = np.zeros((batch, 1, 1, kv_seq))
        mask[..., kv_seq - max(1, kv_seq // 3):] = NEG
    elif mask_kind == "full":
        mask = rng.standard_normal((1, 1, seq, kv_seq))
    scale = d ** -0.5
    params = cpu_params(HOST)
    func = prefill_attention_kernel(batch, hk, group, seq, kv_seq, d, scale, causal, lanes=params.lanes(),
                                    vector_regs=params.vector_regs, num_cores=params.num_cores,
                                    mask_shape=None if mask is None else mask.shape, q_layout=q_l, k_layout=k_l,
                                    v_layout=v_l, out_layout=o_l)
    assert str(func.attrs["edgecc.schedule"]) == PREFILL_SCHEDULE_NAME
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST.tvm())
    q_in = q.reshape(batch, hk, group * seq, d) if q_l == "bhsd" else _bshd(q)
    args = [q_in, k if k_l == "bhsd" else _bshd(k), v if v_l == "bhsd" else _bshd(v)]
    args += [] if mask is None else [mask]
    out_shape = (batch, hk, group * seq, d) if o_l == "bhsd" else (batch, seq, hk * group, d)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"))
    lib["main"](*[tvm.runtime.tensor(a.astype("float32")) for a in args], out)
    got = out.numpy()
    got = got.reshape(batch, hk * group, seq, d) if o_l == "bhsd" else got.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, reference(q, k, v, scale, causal, mask), rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------ the pass


def _gpt_attention(seq=9, heads=3, d=16, causal_mask=True):
    """As the GPT export: [1, S, H, D] projections transposed into the matmuls, constant causal mask."""
    x = [relax.Var(n, relax.TensorType((1, seq, heads, d), "float32")) for n in ("q", "k", "v")]
    mask = np.triu(np.full((seq, seq), NEG, np.float32), 1) if causal_mask else \
        np.random.default_rng(0).standard_normal((seq, seq)).astype("float32")
    bb = relax.BlockBuilder()
    with bb.function("main", x):
        with bb.dataflow():
            q = bb.emit(R.permute_dims(x[0], [0, 2, 1, 3]))
            kt = bb.emit(R.permute_dims(x[1], [0, 2, 3, 1]))
            v = bb.emit(R.permute_dims(x[2], [0, 2, 1, 3]))
            s = bb.emit(R.multiply(bb.emit(R.matmul(q, kt)), relax.const(d ** -0.5, "float32")))
            p = bb.emit(R.nn.softmax(bb.emit(R.add(s, relax.const(mask))), axis=-1))
            o = bb.emit(R.matmul(p, v))
            out = bb.emit_output(R.reshape(bb.emit(R.permute_dims(o, [0, 2, 1, 3])), (1, seq, heads * d)))
        bb.emit_func_output(out)
    return bb.get(), mask


def _minilm_attention(seq=13, heads=2, d=32):
    """As the MiniLM export: a [1, 1, 1, S] additive padding mask input, divide by sqrt(d)."""
    x = [relax.Var(n, relax.TensorType((1, seq, heads, d), "float32")) for n in ("q", "k", "v")]
    m = relax.Var("mask", relax.TensorType((1, 1, 1, seq), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", x + [m]):
        with bb.dataflow():
            q = bb.emit(R.permute_dims(x[0], [0, 2, 1, 3]))
            kt = bb.emit(R.permute_dims(x[1], [0, 2, 3, 1]))
            v = bb.emit(R.permute_dims(x[2], [0, 2, 1, 3]))
            s = bb.emit(R.divide(bb.emit(R.matmul(q, kt)), relax.const(float(np.sqrt(d)), "float32")))
            p = bb.emit(R.nn.softmax(bb.emit(R.add(s, m)), axis=-1))
            out = bb.emit_output(R.permute_dims(bb.emit(R.matmul(p, v)), [0, 2, 1, 3]))
        bb.emit_func_output(out)
    return bb.get()


def _llama_attention(seq=7, kv_heads=3, group=3, d=16):
    """As the Llama export: query heads stacked as [1, Hk, G*S, D] rows, mask added on a 5-D view."""
    hq = kv_heads * group
    qv = relax.Var("q", relax.TensorType((1, hq, seq, d), "float32"))
    kv = relax.Var("k", relax.TensorType((1, kv_heads, seq, d), "float32"))
    vv = relax.Var("v", relax.TensorType((1, seq, kv_heads, d), "float32"))
    mask = np.triu(np.full((seq, seq), -np.inf, np.float32), 1)
    bb = relax.BlockBuilder()
    with bb.function("main", [qv, kv, vv]):
        with bb.dataflow():
            q = bb.emit(R.reshape(qv, (1, kv_heads, group * seq, d)))
            s = bb.emit(R.multiply(bb.emit(R.matmul(q, bb.emit(R.permute_dims(kv, [0, 1, 3, 2])))),
                                   relax.const(d ** -0.5, "float32")))
            s5 = bb.emit(R.add(bb.emit(R.reshape(s, (1, kv_heads, group, seq, seq))), relax.const(mask)))
            p = bb.emit(R.nn.softmax(bb.emit(R.reshape(s5, (1, kv_heads, group * seq, seq))), axis=-1))
            o = bb.emit(R.matmul(p, bb.emit(R.permute_dims(vv, [0, 2, 1, 3]))))
            o4 = bb.emit(R.reshape(o, (1, hq, seq, d)))
            out = bb.emit_output(R.permute_dims(o4, [0, 2, 1, 3]))
        bb.emit_func_output(out)
    return bb.get()




def _kernel_calls(mod):
    """(callee name, the call, its tensor args) of every fused-attention call in main."""
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            gv = e.args[0]
            if gv.name_hint.startswith("prefill_attention"):
                calls.append((gv.name_hint, e, list(e.args[1].fields)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


def _run(mod, arrays, spec=HOST, **kw):
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec, **kw))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def test_gpt_pattern_ir_before_after_and_numerics():
    mod, _ = _gpt_attention()
    before = relax_op_names(mod["main"])
    assert before.count("relax.matmul") == 2 and "relax.nn.softmax" in before
    fused, n = fuse_attention(mod, HOST)
    assert n == 1
    after = relax_op_names(fused["main"])
    # the matmuls, softmax, scale, mask add and all four transposes are gone; the reshape stays
    assert [o for o in after if o != "relax.call_tir"] == ["relax.reshape"], after
    (name, call, args), = _kernel_calls(fused)
    assert [a.name for a in args] == ["q", "k", "v"]  # the untransposed inputs, no mask tensor: causal
    shapes = [[int(x) for x in t.shape.values] for t in [a.ty for a in args] + [call.ty]]
    assert shapes == [[1, 9, 3, 16]] * 4  # [batch, seq, heads, head_dim] in and out
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((1, 9, 3, 16)).astype("float32") for _ in range(3)]
    want = reference(*[a.transpose(0, 2, 1, 3).astype(np.float64) for a in arrays], 16 ** -0.5, causal=True)
    got = _run(mod, arrays)
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3).reshape(1, 9, 48), rtol=1e-4, atol=2e-5)


def test_minilm_padding_mask_pattern():
    mod = _minilm_attention()
    fused, n = fuse_attention(mod, HOST)
    assert n == 1 and "relax.nn.softmax" not in relax_op_names(fused["main"])
    (_, _, args), = _kernel_calls(fused)
    assert [a.name for a in args] == ["q", "k", "v", "mask"]
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((1, 13, 2, 32)).astype("float32") for _ in range(3)]
    mask = np.zeros((1, 1, 1, 13), "float32")
    mask[..., 9:] = NEG  # 4 padding tokens
    want = reference(*[a.transpose(0, 2, 1, 3).astype(np.float64) for a in arrays], 32 ** -0.5, mask=mask)
    np.testing.assert_allclose(_run(mod, arrays + [mask]), want.transpose(0, 2, 1, 3), rtol=1e-4, atol=2e-5)


def test_llama_grouped_query_pattern():
    mod = _llama_attention()
    fused, n = fuse_attention(mod, HOST)
    assert n == 1
    after = relax_op_names(fused["main"])
    assert "relax.nn.softmax" not in after and "relax.matmul" not in after, after
    (_, _, args), = _kernel_calls(fused)
    assert len(args) == 3  # -inf triangle recognised as causal
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 9, 7, 16)).astype("float32")
    k = rng.standard_normal((1, 3, 7, 16)).astype("float32")
    v = rng.standard_normal((1, 7, 3, 16)).astype("float32")
    want = reference(q.astype(np.float64), k.astype(np.float64), v.transpose(0, 2, 1, 3).astype(np.float64),
                     16 ** -0.5, causal=True)
    np.testing.assert_allclose(_run(mod, [q, k, v]), want.transpose(0, 2, 1, 3), rtol=1e-4, atol=2e-5)


def test_non_causal_constant_mask_is_passed_as_a_tensor():
    mod, mask = _gpt_attention(causal_mask=False)
    fused, n = fuse_attention(mod, HOST)
    (_, _, args), = _kernel_calls(fused)
    assert n == 1 and len(args) == 4
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((1, 9, 3, 16)).astype("float32") for _ in range(3)]
    want = reference(*[a.transpose(0, 2, 1, 3).astype(np.float64) for a in arrays], 16 ** -0.5, mask=mask)
    np.testing.assert_allclose(_run(mod, arrays), want.transpose(0, 2, 1, 3).reshape(1, 9, 48), rtol=1e-4,
                               atol=2e-5)


def test_left_alone_when_probabilities_are_used_elsewhere_or_mask_is_per_head():
    seq, heads, d = 5, 2, 8
    x = [relax.Var(n, relax.TensorType((1, heads, seq, d), "float32")) for n in ("q", "k", "v")]
    m = relax.Var("mask", relax.TensorType((1, heads, seq, seq), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", x + [m]):
        with bb.dataflow():
            kt = bb.emit(R.permute_dims(x[1], [0, 1, 3, 2]))
            p1 = bb.emit(R.nn.softmax(bb.emit(R.matmul(x[0], kt)), axis=-1))
            o1 = bb.emit(R.matmul(p1, x[2]))  # p1 is also returned: fusing would compute it twice
            kt2 = bb.emit(R.permute_dims(x[1], [0, 1, 3, 2]))
            p2 = bb.emit(R.nn.softmax(bb.emit(R.add(bb.emit(R.matmul(x[0], kt2)), m)), axis=-1))
            o2 = bb.emit(R.matmul(p2, x[2]))  # a mask per head is not one the kernel reads
            out = bb.emit_output(relax.Tuple([o1, p1, o2]))
        bb.emit_func_output(out)
    mod = bb.get()
    fused, n = fuse_attention(mod, HOST)
    assert n == 0
    tvm.ir.assert_structural_equal(fused, mod)


def test_pipeline_fuses_only_with_schedules():
    mod, _ = _gpt_attention()
    arrays = [np.random.default_rng(5).standard_normal((1, 9, 3, 16)).astype("float32") for _ in range(3)]
    np.testing.assert_allclose(_run(mod, arrays), _run(mod, arrays, with_schedules=False), rtol=1e-4, atol=2e-5)
    lowered = relax_pipeline(HOST)(mod)
    assert any(n.name_hint.startswith("prefill_attention") for n, _ in lowered.functions_items())
    plain = relax_pipeline(HOST, with_schedules=False)(mod)
    assert not any(n.name_hint.startswith("prefill_attention") for n, _ in plain.functions_items())


def test_llm_prefill_graph_is_fused(tmp_path):
    """The exported Llama prefill graph, after the KV-cache rewrite: every layer's attention is one kernel."""
    from edgecc.build import lift_weight_transforms
    from edgecc.frontend.importer import import_model
    from edgecc.frontend.loader import load_model
    from edgecc.frontend.signature import read_signature
    from edgecc.ir_passes import kv_cache as kv
    from edgecc.models import llama

    paths = llama.export_llm(llama.random_llama(seed=1), tmp_path, prefill_len=16)
    mods = {}
    for role in ("decode", "prefill"):
        model = load_model(paths[role])
        sig = read_signature(model)
        mods[role] = (lift_weight_transforms(import_model(model, sig))[0], sig)
    dmod, dsig = mods["decode"]
    pairs = kv.find_kv_pairs(dmod["main"], [t.name for t in dsig.inputs])
    layout = kv.cache_layout(pairs, 64)
    pmod, psig = mods["prefill"]
    presents = kv.match_prefill_presents(pmod["main"], [t.name for t in psig.outputs],
                                         [t.name for t in dsig.outputs], pairs, 16)
    rewritten, _ = kv.rewrite_prefill(pmod, "main", presents, layout, 16)
    layers = relax_op_names(rewritten["main"]).count("relax.nn.softmax")
    assert layers >= 2
    fused, n = fuse_attention(rewritten, HOST)
    assert n == layers and "relax.nn.softmax" not in relax_op_names(fused["main"])


@pytest.mark.cross
def test_neon_fused_attention_under_qemu(tmp_path):
    from edgecc.runtime_bridge.emulated import run_emulated
    from edgecc.runtime_bridge.params_file import write_params

    neon = get_target("arm-neon")
    if not neon.sdk_status().can_run:
        pytest.skip(f"arm-neon cannot run here: {neon.sdk_status().how_it_runs}")
    mod = _llama_attention(seq=5, kv_heads=2, group=3, d=16)
    ex = tvm.compile(mod, target=neon.tvm(), relax_pipeline=relax_pipeline(neon))
    ex.export_library(str(tmp_path / "model.so"), fcompile=tvm.support.cc.cross_compiler(neon.cross_compiler))
    write_params(tmp_path / "params.bin", [])
    rng = np.random.default_rng(6)
    q = rng.standard_normal((1, 6, 5, 16)).astype("float32")
    k = rng.standard_normal((1, 2, 5, 16)).astype("float32")
    v = rng.standard_normal((1, 5, 2, 16)).astype("float32")
    (got,) = run_emulated(tmp_path, neon, [q, k, v])
    want = reference(q.astype(np.float64), k.astype(np.float64), v.transpose(0, 2, 1, 3).astype(np.float64),
                     16 ** -0.5, causal=True)
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3), rtol=1e-4, atol=2e-5)
