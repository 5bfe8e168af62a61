"""GPTQ, AWQ, SmoothQuant and calibration (edgecc/compress): closed-form checks on small random layers, the
calibration errors, and end-to-end builds with `--method` on a tiny ONNX MLP."""

from __future__ import annotations

import numpy as np
import pytest

from edgecc.compress.awq import clip_for, quantize_awq
from edgecc.compress.calibration import ActStats, collect_torch, text_chunks
from edgecc.compress.gptq import quantize_gptq
from edgecc.compress.grid import output_error
from edgecc.compress.rtn import quantize_rtn
from edgecc.compress.schemes import parse_scheme
from edgecc.compress.smoothquant import smooth_weight
from edgecc.errors import EdgeccError

K, HID, N = 128, 128, 64


def _correlated_inputs(m: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with correlated features and a few large-magnitude channels (what real activations look like)."""
    fixed = np.random.default_rng(100)  # the distribution (mixing, channel magnitudes) is the same for all seeds
    mix = fixed.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    chan = np.exp(0.8 * fixed.standard_normal(k))
    rng = np.random.default_rng(seed)
    chan[:4] *= 8.0
    return ((rng.standard_normal((m, k)) @ mix) * chan).astype(np.float32)


def _layer(k=K, n=N, seed=1):
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["w4g32", "w4g128", "w3g64", "w8", "w4g32-asym"])
def test_gptq_output_error_not_above_rtn(scheme):
    x = _correlated_inputs(1024, K)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    rtn = output_error(w, quantize_rtn(w, scheme).dequantize(), st.hessian)
    for act_order in (False, True):
        qt = quantize_gptq(w, st.hessian, scheme, act_order=act_order)
        assert qt.weight.shape == quantize_rtn(w, scheme).weight.shape and qt.weight.dtype == \
            quantize_rtn(w, scheme).weight.dtype
        assert output_error(w, qt.dequantize(), st.hessian) <= rtn
    # and on held-out rows from the same distribution, directly: ||X W - X W_q||
    xt = _correlated_inputs(512, K, seed=7).astype(np.float64)
    err = lambda deq: np.linalg.norm(xt @ w - xt @ deq)  # noqa: E731
    assert err(quantize_gptq(w, st.hessian, scheme).dequantize()) < err(quantize_rtn(w, scheme).dequantize())


@pytest.mark.parametrize("scheme", ["w4g128", "w3g64"])
def test_gptq_act_order_is_the_default_and_generalises_better(scheme):
    """Act-order (columns by decreasing H diagonal, static groups) is the default; with a few large-activation
    channels its held-out output error is clearly below plain column order's."""
    import torch

    x = _correlated_inputs(1024, K)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    threads = torch.get_num_threads()
    default = quantize_gptq(w, st.hessian, scheme)
    assert torch.get_num_threads() == threads  # the column loop's single thread is restored
    ordered = quantize_gptq(w, st.hessian, scheme, act_order=True)
    plain = quantize_gptq(w, st.hessian, scheme, act_order=False)
    np.testing.assert_array_equal(default.weight, ordered.weight)
    xt = _correlated_inputs(512, K, seed=7).astype(np.float64)
    err = lambda deq: np.linalg.norm(xt @ w - xt @ deq)  # noqa: E731
    assert err(ordered.dequantize()) < 0.9 * err(plain.dequantize())


@pytest.mark.parametrize("scheme", ["w4g32", "w4g128", "w3g64", "w4g32-asym"])
def test_gptq_clipped_scales_lower_held_out_error(scheme):
    """The default static grid takes AWQ's clip search (output error on H's diagonal blocks) instead of
    max-abs ranges: lower output error on held-out rows, and ratios within [0.5, 1] (so scales shrink)."""
    x = _correlated_inputs(1024, K)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    clipped = quantize_gptq(w, st.hessian, scheme)
    plain = quantize_gptq(w, st.hessian, scheme, clip=False)
    assert np.all(clipped.scales <= plain.scales * (1 + 1e-6)) and np.all(clipped.scales >= 0.45 * plain.scales)
    assert np.any(clipped.scales < plain.scales * 0.99)
    xt = _correlated_inputs(512, K, seed=7).astype(np.float64)
    err = lambda deq: np.linalg.norm(xt @ w - xt @ deq)  # noqa: E731
    assert err(clipped.dequantize()) < 0.97 * err(plain.dequantize())


def test_gptq_codes_on_the_rtn_grid():
    """GPTQ's QuantizedTensor is an ordinary one: codes in range, scales from its own groups."""
    x = _correlated_inputs(512, K)
    st = ActStats(K)
    st.add(x)
    w = _layer()
    qt = quantize_gptq(w, st.hessian, "w4g32")
    codes = qt.codes()
    assert codes.min() >= 1 and codes.max() <= 15  # symmetric 4-bit: q in [-7, 7] + offset 8
    assert qt.scales.shape == (K // 32, N) and qt.scales.dtype == np.float32 and qt.zeros is None


@pytest.mark.parametrize("scheme", ["w4g32", "w4g128", "w3g64", "w4g32-asym"])
def test_awq_output_error_not_above_rtn(scheme):
    x = _correlated_inputs(1024, K)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    qt, s = quantize_awq(w, st.hessian, st.absmean, scheme)
    assert s.shape == (K,) and s.dtype == np.float32 and np.all(s > 0)
    effective = qt.dequantize() / s.astype(np.float64)[:, None]  # (x / s) @ Q(diag(s) W)
    assert output_error(w, effective, st.hessian) <= output_error(w, quantize_rtn(w, scheme).dequantize(),
                                                                  st.hessian)


def test_act_stats_keep_the_first_position_of_each_sequence():
    """Sequences [B, S, K] (numpy or torch): sink_hessian is x0^T x0 of the first positions (numpy float64
    reference), part of the full hessian; flat rows [M, K] have no sink."""
    import torch

    x = _correlated_inputs(3 * 16, K).reshape(3, 16, K)
    for data in (x, torch.from_numpy(x)):
        st = ActStats(K)
        st.add(data[:2])
        st.add(data[2:])
        x0 = x[:, 0].astype(np.float64)
        np.testing.assert_allclose(st.sink_hessian, x0.T @ x0, rtol=1e-12)
        flat = x.reshape(-1, K).astype(np.float64)
        np.testing.assert_allclose(st.hessian, flat.T @ flat, rtol=1e-4, atol=1e-3)
    flat_st = ActStats(K)
    flat_st.add(x.reshape(-1, K))
    assert flat_st.sink_hessian is None


def test_awq_sink_weight_lowers_the_first_positions_error():
    """A first position with large activations on a few channels (an attention sink): weighting it up in
    AWQ's loss lowers the output error on those rows (direct ||x0 W - x0 W_q||), and the weighted loss itself
    stays at or below RTN's."""
    rng = np.random.default_rng(3)
    x = _correlated_inputs(64 * 16, K).reshape(64, 16, K)
    x[:, 0] = rng.standard_normal((64, K)) * 0.2
    x[:, 0, 40:44] = 60.0 * (1 + 0.1 * rng.standard_normal((64, 4)))
    w = _layer()
    st = ActStats(K)
    st.add(x)
    x0 = x[:, 0].astype(np.float64)
    err0 = lambda qt, s: np.linalg.norm(x0 @ w - x0 @ (qt.dequantize() / s.astype(np.float64)[:, None]))  # noqa
    plain = err0(*quantize_awq(w, st.hessian, st.absmean, "w4g32", sink_weight=1.0))
    qt, s = quantize_awq(w, st.hessian, st.absmean, "w4g32", sink_hessian=st.sink_hessian, sink_weight=8.0)
    assert err0(qt, s) < plain
    hw = st.hessian + 7.0 * st.sink_hessian
    effective = qt.dequantize() / s.astype(np.float64)[:, None]
    assert output_error(w, effective, hw) <= output_error(w, quantize_rtn(w, "w4g32").dequantize(), hw)


def test_awq_no_clip_search_for_query_and_key():
    """Query/key projections get no clip search (llm-awq / AutoAWQ): named so (torch module, ONNX node or BERT
    initializer name) they are plain RTN of diag(s) W. Numpy reference: per (group, column) scale max|v| / 7
    rounded to float32, codes round(v / scale) in [-7, 7]. Other weights keep the clip search: same s, some
    group's range shrunk, output error at or below the unclipped one's."""
    from edgecc.compress.quantize import quantize_one

    x = _correlated_inputs(1024, K)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    scheme = parse_scheme("w4g32")

    def scaled_rtn(s):
        v = (w.astype(np.float64) * s.astype(np.float64)[:, None]).reshape(K // 32, 32, N)
        scale = (np.abs(v).max(1) / 7).astype(np.float32).astype(np.float64)[:, None]
        return (np.clip(np.round(v / scale), -7, 7) * scale).reshape(K, N), scale[:, 0]

    qk = ("blocks.0.q_proj", "/blocks.3/k_proj/MatMul", "encoder.layer.0.attention.self.query.weight",
          "/0/auto_model/encoder/layer.1/attention/self/key/MatMul")
    others = ("blocks.0.v_proj", "/blocks.3/down_proj/MatMul", "encoder.layer.0.attention.self.value.weight",
              "onnx::MatMul_415", None)
    assert not any(clip_for(n) for n in qk) and all(clip_for(n) for n in others)
    for name in qk:
        qt, s, used = quantize_one(w, scheme, "awq", st, name)
        assert used == "awq" and s is not None
        want, _ = scaled_rtn(s)
        np.testing.assert_allclose(qt.dequantize(), want, rtol=0, atol=1e-6)
    qt, s_v, _ = quantize_one(w, scheme, "awq", st, "blocks.0.v_proj")
    np.testing.assert_array_equal(s_v, s)
    plain, ref_scale = scaled_rtn(s)
    assert np.all(qt.scales <= ref_scale + 1e-7) and np.any(qt.scales < 0.97 * ref_scale)
    h = st.hessian / s.astype(np.float64)[:, None] / s.astype(np.float64)[None, :]  # the scaled problem
    ws = w.astype(np.float64) * s.astype(np.float64)[:, None]
    assert output_error(ws, qt.dequantize(), h) <= output_error(ws, plain, h)


def test_smoothquant_preserves_the_float_product():
    x = _correlated_inputs(64, K).astype(np.float64)
    w = _layer()
    st = ActStats(K)
    st.add(x)
    ws, s = smooth_weight(w, st.absmax, alpha=0.5)
    s64 = s.astype(np.float64)
    np.testing.assert_allclose((x / s64) @ ws.astype(np.float64), x @ w.astype(np.float64), rtol=1e-5,
                               atol=1e-5 * np.abs(x @ w).max())
    # the outlier channels are tamed: the activation range per channel is flatter after smoothing
    spread = lambda a: a.max() / np.median(a)  # noqa: E731
    assert spread(st.absmax / s64) < spread(st.absmax)
    np.testing.assert_allclose(s64, np.sqrt(st.absmax) / np.sqrt(np.abs(w).max(1)), rtol=1e-5)


def test_activation_stats_and_torch_hooks():
    import torch

    x = _correlated_inputs(40, 16)
    st = ActStats(16)
    st.add(x[:25])
    st.add(torch.from_numpy(x[25:]))
    h = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(st.hessian, h, rtol=1e-5, atol=1e-6 * np.abs(h).max())  # torch: fp32 per batch
    np.testing.assert_allclose(st.absmax, np.abs(x).max(0), rtol=1e-7)
    assert st.count == 40

    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def run(inp):
        return c(a(inp) + b(inp))

    batches = [torch.from_numpy(x[:20]), torch.from_numpy(x[20:])]
    cal = collect_torch(run, batches, {"a": a, "b": b, "c": c})
    assert cal.stats["a"] is cal.stats["b"]  # same input tensor: one shared statistic
    assert cal.stats["a"].count == 40 and cal.stats["c"].k == 8


def test_calibration_errors_are_one_line(tmp_path):
    from edgecc.compress.calibration import calibrate_onnx, read_text
    from edgecc.compress.quantize import check_method

    onnx_path, _ = _mlp_onnx(tmp_path / "mlp.onnx")
    cases = []
    with pytest.raises(EdgeccError) as e:
        calibrate_onnx(onnx_path, calib=tmp_path / "missing.npz")
    cases.append((e.value, "does not exist"))
    np.savez(tmp_path / "wrong_name.npz", inputs=np.zeros((2, K), np.float32))
    with pytest.raises(EdgeccError) as e:
        calibrate_onnx(onnx_path, calib=tmp_path / "wrong_name.npz")
    cases.append((e.value, "the model takes ['x']"))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((2, K + 1), np.float32))
    with pytest.raises(EdgeccError) as e:
        calibrate_onnx(onnx_path, calib=tmp_path / "wrong_shape.npz")
    cases.append((e.value, "shape"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EdgeccError) as e:
        read_text(tmp_path / "empty.txt")
    cases.append((e.value, "is empty"))
    with pytest.raises(EdgeccError) as e:
        text_chunks([1, 2, 3], chunk=128)
    cases.append((e.value, "fewer than one chunk"))
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(EdgeccError) as e:
        calibrate_onnx(onnx_path, calib_text=tmp_path / "t.txt")
    cases.append((e.value, "tokenizer"))
    with pytest.raises(EdgeccError) as e:
        check_method("gptq", has_calib=False)
    cases.append((e.value, "needs calibration data"))
    with pytest.raises(EdgeccError) as e:
        check_method("magic", has_calib=True)
    cases.append((e.value, "unknown quantization method"))
    for err, needle in cases:
        msg = str(err)
        assert needle in msg and "\n" not in msg and "(fix: " in msg, msg


# ------------------------------------------------------------------------------------------ builds


def _mlp_onnx(path, batch=4):
    from conftest import export_mlp_onnx

    return export_mlp_onnx(path, K, HID, N, batch)


@pytest.fixture(scope="module")
def mlp_with_calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    onnx_path, w = _mlp_onnx(d / "mlp.onnx")
    np.savez(d / "calib.npz", x=_correlated_inputs(256, K).reshape(64, 4, K))  # 64 samples of [4, K]
    return onnx_path, w, d / "calib.npz"


def test_onnx_calibration_matches_numpy(mlp_with_calib):
    from edgecc.compress.calibration import calibrate_onnx, weight_key

    onnx_path, w, npz = mlp_with_calib
    cal = calibrate_onnx(onnx_path, calib=npz)
    x = np.load(npz)["x"].reshape(-1, K).astype(np.float64)
    np.testing.assert_allclose(cal.stats["fc1.weight"].hessian, x.T @ x, rtol=1e-6)
    h = np.maximum(x @ w["w1"] + w["b1"], 0)
    np.testing.assert_allclose(cal.stats["fc2.weight"].hessian, h.T @ h, rtol=1e-4, atol=1e-6 * np.abs(h.T @ h).max())
    # found by content too (Gemm's transB weight in the [K, N] layout of the deploy parameter)
    assert cal.lookup("renamed", w["w2t"]) is cal.stats["fc2.weight"]
    assert weight_key(w["w1"]) in cal.by_key
    # content wins over a name that belongs to another weight (torch's generated initializer names differ
    # between an LLM's prefill and decode graphs); a weight the calibration never saw falls back to the name
    assert cal.lookup("fc1.weight", w["w2t"]) is cal.stats["fc2.weight"]
    assert cal.lookup("fc2.weight", w["w2t"] + 1.0) is cal.stats["fc2.weight"]


@pytest.mark.parametrize("method,scheme", [("gptq", "w4g32"), ("awq", "w4g32"), ("smoothquant", "w8a8")])
def test_build_with_method_closer_to_fp32_than_rtn(method, scheme, mlp_with_calib, tmp_path):
    import onnxruntime as ort

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact

    onnx_path, w, npz = mlp_with_calib
    xs = _correlated_inputs(64, K, seed=11).reshape(16, 4, K)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = np.stack([sess.run(None, {"x": x})[0] for x in xs])

    def err(out, **kw):
        result = build_artifact(onnx_path, tmp_path / out, target="host", quantize=scheme, **kw)
        art = load_artifact(tmp_path / out)
        got = np.stack([art.run({"x": x})["y"] for x in xs])
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), result.manifest["compression"]

    e_rtn, _ = err("rtn")
    e_alg, comp = err(method, method=method, calib=npz)
    assert comp["method"] == method and comp["calibration"] == "calib.npz"
    assert [op["method"] for op in comp["annotated_ops"]] == [method, method], comp["annotated_ops"]
    if method in ("awq", "smoothquant"):  # the input scale is an extra parameter in front of the matmul
        assert all(op["params"][-1].endswith(".input_scale") for op in comp["annotated_ops"])
    assert e_alg <= e_rtn * 1.001, (e_alg, e_rtn)


def test_cli_build_method_errors(cli, mlp_with_calib, tmp_path):
    onnx_path, _, npz = mlp_with_calib
    r = cli("build", onnx_path, "-o", tmp_path / "a", "--quantize", "w4g32", "--method", "gptq")
    assert r.exit_code == 2 and "needs calibration data" in r.output, r.output
    r = cli("build", onnx_path, "-o", tmp_path / "b", "--method", "gptq", "--calib", npz)
    assert r.exit_code == 2 and "need --quantize" in r.output, r.output
    r = cli("build", onnx_path, "-o", tmp_path / "c", "--quantize", "w4g32", "--method", "gptq",
            "--calib", tmp_path / "nope.npz")
    assert r.exit_code == 2 and "does not exist" in r.output, r.output
    assert not (tmp_path / "c").exists()
    r = cli("build", onnx_path, "-o", tmp_path / "d", "--quantize", "w4g32", "--method", "gptq", "--calib", npz)
    assert r.exit_code == 0, r.output


def test_llama_ptq_tiny_model_gptq_awq_not_worse_than_rtn():
    """On a tiny random Llama: every method quantizes all block linears to the build's grid, and GPTQ/AWQ's
    total calibration-set layer error is not above RTN's."""
    import torch

    from edgecc.compress.calibration import llama_calibration
    from edgecc.compress.llama_ptq import LINEARS, quantize_llama, quantize_llama_sequential
    from edgecc.models.llama import random_llama

    model = random_llama()
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, model.cfg.vocab, 256))
    cal = llama_calibration(model, ids, chunk=32, max_chunks=8)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    k0 = model.blocks[0].q_proj.weight.shape[1]
    from edgecc.compress.recipe import Recipe

    scheme = Recipe(default=parse_scheme("w4g32" if k0 % 32 == 0 else "w8"), min_params=0)  # tiny layers too
    out = {}
    for method in ("rtn", "gptq", "awq", "gptq-seq", "awq-seq"):
        model.load_state_dict(fp)
        if method.endswith("-seq"):
            chunks = [np.asarray(ids[i:i + 32], np.int64) for i in range(0, 256, 32)]
            report = quantize_llama_sequential(model, scheme, method[:-4], chunks)
        else:
            report = quantize_llama(model, scheme, method, None if method == "rtn" else cal)
        assert len(report) == len(model.blocks) * len(LINEARS)
        x = torch.tensor([ids[:32]])
        mask = torch.full((32, 32), float("-inf")).triu(1)
        with torch.no_grad():
            out[method] = model.logits(model.run(x, torch.arange(32), [], mask)[0])
    model.load_state_dict(fp)
    with torch.no_grad():
        ref = model.logits(model.run(x, torch.arange(32), [], mask)[0])
    errs = {m: float((o - ref).norm() / ref.norm()) for m, o in out.items()}
    assert all(e < 0.5 for e in errs.values()), errs
    assert all(errs[m] <= errs["rtn"] * 1.05 for m in ("gptq", "awq", "gptq-seq", "awq-seq")), errs


def test_llama_ptq_weights_are_what_the_build_stores():
    """The torch Llama used for perplexity holds exactly the build's weights: GPTQ's dequantized codes with
    the build's defaults, and AWQ's Q(diag(s) W) / s (the build's x * (1/s) in front of the matmul)."""
    import torch

    from edgecc.compress.calibration import llama_calibration
    from edgecc.compress.llama_ptq import quantize_llama
    from edgecc.compress.recipe import Recipe
    from edgecc.models.llama import random_llama

    model = random_llama()
    ids = list(np.random.default_rng(0).integers(0, model.cfg.vocab, 128))
    cal = llama_calibration(model, ids, chunk=32, max_chunks=4)
    recipe = Recipe(default=parse_scheme("w4g32"), min_params=0)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("gptq", "awq"):
        model.load_state_dict(fp)
        quantize_llama(model, recipe, method, cal)
        for name in ("blocks.0.q_proj", "blocks.1.down_proj"):
            w = fp[name + ".weight"].numpy().T.astype(np.float32)
            st = cal.stats[name]
            if method == "gptq":
                want = quantize_gptq(w, st.hessian, "w4g32").dequantize()
            else:
                qt, s = quantize_awq(w, st.hessian, st.absmean, "w4g32", clip=clip_for(name),
                                     sink_hessian=st.sink_hessian)
                want = qt.dequantize().astype(np.float64) / s.astype(np.float64)[:, None]
            got = dict(model.named_parameters())[name + ".weight"].detach().numpy().T
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            assert not np.allclose(got, w, atol=1e-6)
    model.load_state_dict(fp)
    assert torch.equal(model.blocks[0].q_proj.weight, fp["blocks.0.q_proj.weight"])


def test_llm_build_gptq_calibrates_on_prefill(tmp_path):
    """Decoder build: calibration runs the prefill graph; the decode graph finds its weights by content."""
    import onnx

    from edgecc.build_llm import build_llm_artifact
    from edgecc.compress.calibration import _weight_inputs, calibrate_onnx
    from edgecc.models.llama import export_llm, random_llama

    model = random_llama()
    paths = export_llm(model, tmp_path / "llm", prefill_len=16)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", input_ids=rng.integers(0, model.cfg.vocab, (4, 1, 16)),
             last_index=np.full((4, 1), 15))
    cal = calibrate_onnx(paths["prefill"], calib=tmp_path / "c.npz")
    decode_weights = _weight_inputs(onnx.load(str(paths["decode"])))
    assert decode_weights and all(cal.lookup("-", w) is not None for _, _, w in decode_weights)
    result = build_llm_artifact(tmp_path / "llm", tmp_path / "art", max_context=64, quantize="w4g32",
                                method="gptq", calib=tmp_path / "c.npz")
    comp = result.manifest["compression"]
    assert comp["method"] == "gptq" and comp["annotated_ops"]
    # linears get GPTQ; the embedding lookup (edgecc.quantized_gather) has no activations to calibrate: RTN
    assert {op["method"] for op in comp["annotated_ops"] if op["op"] == "matmul"} == {"gptq"}
    assert {op["method"] for op in comp["annotated_ops"] if op["op"] == "gather"} <= {"rtn"}
