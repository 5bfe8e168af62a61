"""edgecc.ir_passes.merge_linears: linears reading one activation -> one matmul + slices.

IR before -> after (TVM pass-test style), the cases that must stay apart, and built modules against
onnxruntime / numpy float64 for float and quantized weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax

from edgecc.compress.quantize import quantize_weights
from edgecc.compress.rtn import quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.ir_passes import compression as C
from edgecc.ir_passes.merge_linears import concat_packed, merge_linears

K = 128  # K * 32 = 4096: every weight is big enough to be quantized by default
WIDTHS = {"wq": 64, "wk": 32, "wv": 96}  # 32 and 96: not whole 64-column storage tiles (re-tiled path)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal((K, w)) / np.sqrt(K)).astype(np.float32) for n, w in WIDTHS.items()}


def _three_linears(x_shape=(1, 2, K), second_input=False):
    """q/k/v = x @ Wq, x @ Wk, x @ Wv (k reads `y` instead when second_input); returns (q, k, v)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    y = relax.Var("y", relax.TensorType(x_shape, "float32"))
    ws = {n: relax.Var(n, relax.TensorType((K, w), "float32")) for n, w in WIDTHS.items()}
    inputs = [x, y] if second_input else [x]
    with bb.function("main", [*inputs, *ws.values()], attrs={"num_input": len(inputs)}):
        with bb.dataflow():
            q = bb.emit(relax.op.matmul(x, ws["wq"]))
            k = bb.emit(relax.op.matmul(y if second_input else x, ws["wk"]))
            v = bb.emit(relax.op.matmul(x, ws["wv"]))
            gv = bb.emit_output(relax.Tuple([q, k, v]))
        bb.emit_func_output(gv)
    return bb.get()


def _expected_float(x_shape=(1, 2, K)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("wq_merged3", relax.TensorType((K, sum(WIDTHS.values())), "float32"))
    axis = len(x_shape) - 1
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            m = bb.emit(relax.op.matmul(x, w))
            outs, off = [], 0
            for n in WIDTHS.values():
                outs.append(bb.emit(relax.op.strided_slice(m, [axis], [off], [off + n], assume_inbound=True)))
                off += n
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    return bb.get()


def _ops(func):
    from conftest import relax_op_names

    return relax_op_names(func)


def test_float_ir_before_after():
    ws = _weights()
    before = _three_linears()
    assert _ops(before["main"]).count("relax.matmul") == 3
    after, named, groups = merge_linears(before, list(ws.items()))
    assert groups == 1
    tvm.ir.assert_structural_equal(after, _expected_float())
    # one weight, the source weights side by side along N (built here, not at run time)
    assert [n for n, _ in named] == ["wq.merged3"]
    np.testing.assert_array_equal(named[0][1], np.concatenate(list(ws.values()), axis=1))


def test_different_inputs_do_not_merge():
    ws = _weights()
    before = _three_linears(second_input=True)
    after, named, groups = merge_linears(before, list(ws.items()))
    assert groups == 1  # q and v share x; k reads y
    ops = _ops(after["main"])
    assert ops.count("relax.matmul") == 2 and ops.count("relax.strided_slice") == 2
    assert [n for n, _ in named] == ["wq.merged2", "wk"]
    np.testing.assert_array_equal(named[0][1], np.concatenate([ws["wq"], ws["wv"]], axis=1))


def test_different_schemes_do_not_merge(tmp_path):
    ws = _weights()
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "w4g32-asym", "min_params": 0, "layers": {"wk": "w4g32"}}))
    qmod, params, _ = quantize_weights(_three_linears(), list(ws.items()), str(recipe))
    after, named, groups = merge_linears(qmod, params)
    assert groups == 1
    calls = _quant_calls(after)
    assert sorted((C.attrs_dict(c.attrs)["scheme"], C.attrs_dict(c.attrs)["name"]) for c in calls) == [
        ("w4g32", "wk"), ("w4g32-asym", "wq+wv")]
    assert [n for n, _ in named if n.startswith("wk.")] == ["wk.qweight", "wk.scales"]  # k kept as it was


def _quant_calls(mod):
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == C.QUANT_MATMUL:
            found.append(e)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


@pytest.mark.parametrize("scheme", ["w8", "w4g32-asym", "w4g32a8-asym", "w8a8"])
def test_quantized_ir_before_after(scheme):
    ws = _weights()
    qmod, params, _ = quantize_weights(_three_linears(), list(ws.items()), scheme)
    assert len(_quant_calls(qmod)) == 3
    after, named, groups = merge_linears(qmod, params)
    assert groups == 1
    (call,) = _quant_calls(after)
    ops = _ops(after["main"])
    assert ops.count("relax.strided_slice") == 3 and "relax.matmul" not in ops
    ann = C.attrs_dict(call.attrs)
    s = parse_scheme(scheme)
    assert ann["out_features"] == sum(WIDTHS.values()) and ann["in_features"] == K
    assert ann["scheme"] == s.name and ann["name"] == "wq+wk+wv"
    # the merged packed tensors are exactly what quantizing the concatenated weight gives (per-column groups)
    whole = quantize_rtn(np.concatenate(list(ws.values()), axis=1), s)
    stored = s.stored_shapes(K, sum(WIDTHS.values()))
    got = dict(named)
    assert list(got) == [f"wq.{p}.merged3" for p in ("qweight", "scales", "zeros") if p != "zeros" or not s.symmetric]
    ref = whole.tensors()
    for part, key in (("qweight", "weight"), ("scales", "scales"), ("zeros", "zeros")):
        if f"wq.{part}.merged3" in got:
            arr = got[f"wq.{part}.merged3"]
            assert arr.shape == stored[key][0]
            np.testing.assert_array_equal(arr, ref[key])
    # memory does not grow: the merged tensors hold exactly the bytes of the sources
    assert sum(a.nbytes for _, a in named) == sum(a.nbytes for _, a in params)


def test_concat_packed_tiles_round_trip():
    rng = np.random.default_rng(2)
    from edgecc.compress.schemes import tile_columns

    a, b = rng.integers(0, 255, (8, 32)), rng.integers(0, 255, (8, 96))
    whole = tile_columns(np.concatenate([a, b], axis=1), 64)
    np.testing.assert_array_equal(concat_packed([tile_columns(a, 32), tile_columns(b, 32)], [32, 96], False), whole)


def _qkv_onnx(path, ws):
    """x[2, 3, K] -> three MatMuls (q, k, v) off x, each its own graph output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = list(ws)
    nodes = [helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in names]
    graph = helper.make_graph(
        nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, [2, 3, ws[n].shape[1]]) for n in names],
        [numpy_helper.from_array(ws[n], n) for n in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ref(x, w, scheme):
    x64 = x.astype(np.float64)
    if scheme is None:
        return x64 @ w.astype(np.float64)
    return x64 @ quantize_rtn(w, scheme).dequantize().astype(np.float64)


@pytest.mark.parametrize("quantize", [None, "w4g32-asym", "w8", "mixed"])
def test_built_module_matches_reference(quantize, tmp_path, monkeypatch):
    import onnxruntime as ort

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    ws = _weights(4)
    onnx_path = _qkv_onnx(tmp_path / "qkv.onnx", ws)
    schemes = {n: quantize for n in ws}
    arg = quantize
    if quantize == "mixed":  # k gets another scheme: only q and v may merge
        schemes = {"wq": "w4g32-asym", "wk": "w8", "wv": "w4g32-asym"}
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"default": "w4g32-asym", "min_params": 0, "layers": {"wk": "w8"}}))
        arg = str(recipe)
    out = tmp_path / "art"
    if quantize is None:  # builds merge quantized weights only (merge_linears.BUILD_KINDS); "all" adds float
        default = build_artifact(onnx_path, tmp_path / "default", target="host")
        assert not any(".merged" in p["name"] for p in default.manifest["params"])
        monkeypatch.setenv("EDGECC_MERGE_LINEARS", "all")
    result = build_artifact(onnx_path, out, target="host", quantize=arg)
    names = [p["name"] for p in result.manifest["params"]]
    merged = [n for n in names if ".merged" in n]
    if quantize == "mixed":
        assert merged and all(n.endswith(".merged2") for n in merged) and any(n.startswith("wk.") for n in names)
    else:
        assert merged and all(n.endswith(".merged3") for n in merged) and not any(n.startswith("wk") for n in names)
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    got = load_artifact(out).run({"x": x})
    for n, w in ws.items():
        ref = _ref(x, w, schemes[n])
        np.testing.assert_allclose(got[f"y_{n}"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    if quantize is None:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        for n, o in zip(ws, sess.run(None, {"x": x})):
            np.testing.assert_allclose(got[f"y_{n}"], o, rtol=1e-5, atol=1e-5)


def _shared_weight_layers(extra_use: bool):
    """Two 'layers' applying the same q/k/v weights to different activations (ALBERT-style sharing);
    extra_use: Wk is also read by an add, outside any linear."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, K), "float32"))
    ws = {n: relax.Var(n, relax.TensorType((K, w), "float32")) for n, w in WIDTHS.items()}
    with bb.function("main", [x, *ws.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            outs, h = [], x
            for _ in range(2):
                q, k, v = (bb.emit(relax.op.matmul(h, ws[n])) for n in ws)
                outs += [q, k, v]
                h = bb.emit(relax.op.add(h, relax.op.sum(q, axis=[-1], keepdims=True)))
            if extra_use:
                outs.append(bb.emit(relax.op.add(ws["wk"], ws["wk"])))
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    return bb.get()


def test_shared_weights_merge_once_and_other_uses_block_merging():
    ws = _weights()
    after, named, groups = merge_linears(_shared_weight_layers(False), list(ws.items()))
    assert groups == 2 and [n for n, _ in named] == ["wq.merged3"]  # both layers read one merged tensor
    assert _ops(after["main"]).count("relax.matmul") == 2
    # Wk also feeds an add: merging would store it twice, so nothing merges
    before = _shared_weight_layers(True)
    after, named, groups = merge_linears(before, list(ws.items()))
    assert groups == 0 and [n for n, _ in named] == list(ws)
    tvm.ir.assert_structural_equal(after, before)


def test_quantized_llm_build_merges_prefill_and_decode_alike(tmp_path, monkeypatch):
    """A tiny llama, every linear w4g32-asym: q/k/v and gate/up merge in both entries, the merged tensors
    are stored once (weight bytes unchanged), and generation matches the build without merging."""
    from edgecc.build_llm import build_llm_artifact
    from edgecc.models import llama
    from edgecc.runtime_bridge.llm_session import LLMSession

    export = llama.export_llm(llama.random_llama(seed=1), tmp_path / "tiny", prefill_len=16)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"default": "w4g32-asym", "min_params": 0, "layers": {"*embed*": "none"}}))
    arts = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("EDGECC_MERGE_LINEARS", mode)
        arts[mode] = build_llm_artifact(export["decode"].parent, tmp_path / f"art{mode}", max_context=64,
                                        quantize=str(recipe))
    merged = [p["name"] for p in arts["1"].manifest["params"] if ".merged" in p["name"]]
    cfg = llama.TINY_LLAMA
    packed = 3  # qweight, scales, zeros (asymmetric)
    assert sum(n.endswith(".merged3") for n in merged) == cfg.n_layers * packed  # q/k/v, shared by both entries
    assert sum(n.endswith(".merged2") for n in merged) == cfg.n_layers * packed  # gate/up
    assert not any(".merged" in p["name"] for p in arts["0"].manifest["params"])
    assert arts["1"].manifest["memory"]["weights_bytes"] == arts["0"].manifest["memory"]["weights_bytes"]
    sessions = {m: LLMSession(tmp_path / f"art{m}", num_threads=1) for m in arts}
    prompt = list(range(3, 19))
    logits = {m: [np.asarray(s.prefill(prompt))] for m, s in sessions.items()}
    for _ in range(4):
        token = int(np.argmax(logits["0"][-1].reshape(-1)[-cfg.vocab:]))
        for m, s in sessions.items():
            logits[m].append(np.asarray(s.decode(token)))
    for a, b in zip(logits["0"], logits["1"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
