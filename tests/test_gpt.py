"""The GPT-2-style decoder exports (edgecc.models.gpt): torch == onnxruntime, the KV path is consistent with a
full-sequence run, exports are byte-stable, and edgecc builds of the tiny ones verify against onnxruntime.

Tolerance: float32 throughout; atol 1e-4 as in test_models.py (observed differences are ~2e-6).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgecc.models import gpt, registry

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
CFG = gpt.GPT_TINY
N = 16  # the tiny registry entries' prefill length / past length


def _run(path, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    return {
        "prefill": registry.MODELS["tiny-gpt-prefill"].export(d / "prefill.onnx"),
        "decode": registry.MODELS["tiny-gpt-decode"].export(d / "decode.onnx"),
    }


def test_signatures(tiny_files):
    h, hd = CFG.n_heads, CFG.head_dim
    for kind, (ins, outs) in {"prefill": gpt.prefill_io(CFG), "decode": gpt.decode_io(CFG)}.items():
        model = onnx.load(str(tiny_files[kind]))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == gpt.OPSET
        inits = {i.name for i in model.graph.initializer}
        assert [i.name for i in model.graph.input if i.name not in inits] == ins
        assert [o.name for o in model.graph.output] == outs
        assert not {"Range", "Trilu", "Shape"} & {n.op_type for n in model.graph.node}
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
        seq, kv = (N, N) if kind == "prefill" else (1, N + 1)
        assert shapes["logits"] == [1, seq, CFG.vocab]
        assert shapes["present_key_1"] == shapes["present_value_0"] == [1, h, kv, hd]


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_onnxruntime_matches_torch(kind, tiny_files):
    entry = registry.MODELS[f"tiny-gpt-{kind}"]
    reference = gpt.torch_prefill if kind == "prefill" else gpt.torch_decode
    for seed in (0, 1):
        feeds = entry.feeds(seed=seed)
        got, want = _run(tiny_files[kind], feeds), reference(feeds, CFG)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def test_decode_on_prefill_kv_equals_full_sequence(tiny_files, tmp_path):
    """prefill(ids[:N]) -> KV; decode(ids[N], position N, KV) == prefill(ids[:N+1]) at the last position."""
    full = gpt.export_gpt_prefill(tmp_path / "prefill17.onnx", seq_len=N + 1, cfg=CFG)
    ids = np.random.default_rng(7).integers(0, CFG.vocab, (1, N + 1), dtype=np.int64)
    first = _run(tiny_files["prefill"], {"input_ids": ids[:, :N]})
    feeds = {"input_ids": ids[:, N:], "position_ids": np.array([[N]], dtype=np.int64)}
    feeds.update({name.replace("present", "past"): v for name, v in first.items() if name != "logits"})
    step = _run(tiny_files["decode"], feeds)
    whole = _run(full, {"input_ids": ids})
    np.testing.assert_allclose(first["logits"], whole["logits"][:, :N], rtol=0, atol=ATOL)  # causality
    np.testing.assert_allclose(step["logits"], whole["logits"][:, N:], rtol=0, atol=ATOL)
    for name in gpt.kv_names(CFG, "present"):
        np.testing.assert_allclose(step[name], whole[name], rtol=0, atol=ATOL, err_msg=name)


def test_exports_are_deterministic(tiny_files, tmp_path):
    assert gpt.export_gpt_prefill(tmp_path / "a.onnx", N, CFG).read_bytes() == tiny_files["prefill"].read_bytes()
    assert gpt.export_gpt_decode(tmp_path / "b.onnx", N, CFG).read_bytes() == tiny_files["decode"].read_bytes()
    other = gpt.export_gpt_decode(tmp_path / "c.onnx", N, CFG, seed=1)
    assert other.read_bytes() != tiny_files["decode"].read_bytes()


def test_streamed_weight_bytes(tiny_files):
    b = gpt.streamed_weight_bytes(tiny_files["decode"])
    d, v, p = CFG.d_model, CFG.vocab, CFG.max_positions
    assert b["gathered_tables"] == 4 * (v + p) * d  # wte and wpe: one row read per step
    per_layer = 4 * (4 * d * d + 2 * CFG.mlp_ratio * d * d) + 4 * (3 * d + d + CFG.mlp_ratio * d + d + 4 * d)
    assert b["streamed"] == CFG.n_layers * per_layer + 4 * (v * d + 2 * d)


def test_lengths_are_checked(tmp_path):
    with pytest.raises(ValueError):
        gpt.export_gpt_prefill(tmp_path / "x.onnx", seq_len=CFG.max_positions + 1, cfg=CFG)
    with pytest.raises(ValueError):
        gpt.export_gpt_decode(tmp_path / "x.onnx", past_len=CFG.max_positions, cfg=CFG)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_edgecc_build_verifies(kind, tiny_files, tmp_path):
    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.verify import verify

    out = tmp_path / kind
    build_artifact(tiny_files[kind], out, target="host")
    reports, _ = verify(out, tiny_files[kind], registry.MODELS[f"tiny-gpt-{kind}"].feeds(seed=0))
    assert [r.name for r in reports] == (gpt.prefill_io(CFG) if kind == "prefill" else gpt.decode_io(CFG))[1]
    failed = [(r.name, r.max_abs_err) for r in reports if not r.passed]
    assert not failed, failed
