"""The model exporters (edgecc.models): valid ONNX, onnxruntime agrees with torch, byte-stable exports.

Tolerance: every model computes in float32. atol 1e-4 is ~1000x the float32 rounding these small graphs
accumulate (observed differences are 1e-7..1e-5), and far below any real bug (a wrong mask, pooling or
normalization moves outputs by 1e-2 or more).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from edgecc.models import cnn_zoo, minilm, registry, synthetic

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the light models carry an unused initializer ORT warns about
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path, feeds):
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _io(model):
    inits = {i.name for i in model.graph.initializer}

    def desc(v):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        return v.name, v.type.tensor_type.elem_type, dims

    return [desc(v) for v in model.graph.input if v.name not in inits], [desc(v) for v in model.graph.output]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", sorted(synthetic.SPECS))
def test_synthetic_export_matches_torch(name, tmp_path):
    path = synthetic.export(name, tmp_path / f"{name}.onnx", seed=0)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == synthetic.OPSET
    spec = synthetic.SPECS[name]
    inputs, outputs = _io(model)
    assert [i[0] for i in inputs] == list(spec.input_names)
    assert [o[0] for o in outputs] == list(spec.output_names)
    for seed in (0, 1):
        feeds = synthetic.input_feeds(name, seed)
        got = _run(path, feeds)
        want = synthetic.torch_outputs(name, feeds, seed=0)
        for out in spec.output_names:
            assert got[out].shape == want[out].shape
            np.testing.assert_allclose(got[out], want[out], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(synthetic.SPECS))
def test_synthetic_export_is_deterministic(name, tmp_path):
    a = synthetic.export(name, tmp_path / "a.onnx", seed=0)
    b = synthetic.export(name, tmp_path / "b.onnx", seed=0)
    c = synthetic.export(name, tmp_path / "c.onnx", seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert _digest(a) != _digest(c), "a different seed must give different weights"


def test_synthetic_shapes(tmp_path):
    expected = {
        "tiny_transformer": ([("input_ids", onnx.TensorProto.INT64, [1, 16])], [("last_hidden_state", 1, [1, 16, 64])]),
        "tiny_cnn": ([("image", 1, [1, 3, 32, 32])], [("logits", 1, [1, 10])]),
        "tiny_mlp": ([("x", 1, [1, 32])], [("y", 1, [1, 10])]),
    }
    for name, (ins, outs) in expected.items():
        model = onnx.load(str(synthetic.export(name, tmp_path / f"{name}.onnx")))
        assert _io(model) == (ins, outs)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "tiny_cnn.onnx")).graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool"} <= ops
    ops = {n.op_type for n in onnx.load(str(tmp_path / "tiny_transformer.onnx")).graph.node}
    assert {"Gather", "Softmax", "LayerNormalization", "Erf", "MatMul"} <= ops


# ---------------------------------------------------------------------------------------------- MiniLM

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory):
    return minilm.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx", seq_len=128)


def test_minilm_graph(minilm_onnx):
    model = onnx.load(str(minilm_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    inputs, outputs = _io(model)
    assert inputs == [
        ("input_ids", onnx.TensorProto.INT64, [1, 128]),
        ("attention_mask", onnx.TensorProto.INT64, [1, 128]),
    ]
    assert outputs == [
        ("last_hidden_state", onnx.TensorProto.FLOAT, [1, 128, 384]),
        ("sentence_embedding", onnx.TensorProto.FLOAT, [1, 384]),
    ]
    # TVM 0.27's importer fails on ConstantOfShape with an empty shape; the export must not contain it at all.
    assert "ConstantOfShape" not in {n.op_type for n in model.graph.node}


def test_minilm_embeddings(minilm_onnx):
    embs = []
    for text in SENTENCES:
        out = _run(minilm_onnx, minilm.tokenize([text], 128))
        assert out["last_hidden_state"].shape == (1, 128, 384)
        embs.append(out["sentence_embedding"][0])
    embs = np.stack(embs)
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    cos = embs @ embs.T
    assert np.abs(embs[0] - embs[2]).max() > 1e-2
    assert cos[0, 1] > cos[0, 2] + 0.2, f"paraphrases should be closer than unrelated sentences: {cos}"


def test_minilm_matches_torch(minilm_onnx):
    """ONNX (onnxruntime) vs torch: sentence-transformers' own pipeline, and transformers' BertModel states."""
    import torch

    pytest.importorskip("sentence_transformers")
    feeds = minilm.tokenize(SENTENCES[:2], 128)
    want_emb = minilm.reference_embeddings(SENTENCES[:2], 128)
    bert = minilm.load_bert()
    with torch.no_grad():
        want_hidden = bert(
            input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])
        ).last_hidden_state.numpy()
    for i in range(2):
        got = _run(minilm_onnx, {k: v[i : i + 1] for k, v in feeds.items()})
        np.testing.assert_allclose(got["sentence_embedding"][0], want_emb[i], rtol=0, atol=ATOL)
        n = int(feeds["attention_mask"][i].sum())  # padded positions are not meaningful outputs
        np.testing.assert_allclose(got["last_hidden_state"][0, :n], want_hidden[i, :n], rtol=0, atol=ATOL)


def test_minilm_tokenize_matches_sentence_transformers():
    feeds = minilm.tokenize(SENTENCES, 32)
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (3, 32)
    assert feeds["attention_mask"].dtype == np.int64
    assert (feeds["input_ids"][:, 0] == 101).all()  # [CLS]
    lengths = feeds["attention_mask"].sum(axis=1)
    assert all(feeds["input_ids"][i, lengths[i] - 1] == 102 for i in range(3))  # [SEP]
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 0).all()  # [PAD]
    long = minilm.tokenize(["word " * 100], 16)
    assert long["attention_mask"].sum() == 16 and long["input_ids"][0, -1] == 102  # truncated, still ends in [SEP]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm.model_dir()), local_files_only=True)
    ref = tok(SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="np")
    np.testing.assert_array_equal(feeds["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(feeds["attention_mask"], ref["attention_mask"])


def test_minilm_export_is_deterministic(minilm_onnx, tmp_path):
    again = minilm.export_minilm(tmp_path / "again.onnx", seq_len=128)
    assert _digest(again) == _digest(minilm_onnx)


def test_minilm_rejects_bad_seq_len(tmp_path):
    with pytest.raises(ValueError):
        minilm.export_minilm(tmp_path / "x.onnx", seq_len=0)
    with pytest.raises(ValueError):
        minilm.tokenize(["x"], 513)


# ---------------------------------------------------------------------------------------------- CNN zoo

EXPECTED_ZOO = {
    "alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
    "shufflenet", "squeezenet", "vgg19", "zfnet512",
}  # fmt: skip


def test_zoo_lists_the_wheel_models():
    models = cnn_zoo.light_models()
    assert EXPECTED_ZOO <= set(models), sorted(models)
    for name, path in models.items():
        assert path.is_file()
        z = cnn_zoo.info(name)
        assert z.input_shape == (1, 3, 224, 224)
        feeds = cnn_zoo.input_feeds(name, seed=3)
        assert list(feeds) == [z.input_name] and feeds[z.input_name].dtype == np.float32
        np.testing.assert_array_equal(feeds[z.input_name], cnn_zoo.input_feeds(name, seed=3)[z.input_name])
    with pytest.raises(KeyError):
        cnn_zoo.info("no-such-model")


@pytest.mark.parametrize("name", sorted(EXPECTED_ZOO))
def test_zoo_model_runs_and_matches_shipped_output(name):
    z = cnn_zoo.info(name)
    onnx.checker.check_model(onnx.load(str(z.path)))
    got = _run(z.path, cnn_zoo.reference_feeds(name))[z.output_name]
    want = cnn_zoo.reference_outputs(name)[z.output_name]
    assert got.shape == want.shape == z.output_shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet", "resnet50"])
def test_zoo_random_weights_make_output_input_dependent(name, tmp_path):
    z = cnn_zoo.info(name)
    path = cnn_zoo.copy_model(name, tmp_path / "rw.onnx", random_weights=True, seed=0)
    onnx.checker.check_model(onnx.load(str(path)))
    assert "ConstantOfShape" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    a = _run(path, cnn_zoo.input_feeds(name, 1))[z.output_name]
    b = _run(path, cnn_zoo.input_feeds(name, 2))[z.output_name]
    assert np.isfinite(a).all() and np.abs(a - b).max() > 1e-4
    assert a.max() < 0.999  # softmax not saturated to one-hot
    again = cnn_zoo.copy_model(name, tmp_path / "rw2.onnx", random_weights=True, seed=0)
    assert _digest(again) == _digest(path)
    shipped = cnn_zoo.copy_model(name, tmp_path / "copy.onnx")
    assert shipped.read_bytes() == z.path.read_bytes()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_entries_are_complete():
    models = registry.MODELS
    for name in ("minilm", "tiny-transformer", "tiny-cnn", "tiny-mlp", "resnet50", "densenet121", "alexnet"):
        assert name in models
    for name, entry in models.items():
        assert entry.name == name and entry.description and callable(entry.export_fn)


@pytest.mark.parametrize("name", ["tiny-mlp", "tiny-cnn", "squeezenet"])
def test_registry_export_and_feeds_agree(name, tmp_path):
    entry = registry.MODELS[name]
    path = entry.export(tmp_path / "sub" / "m.onnx")
    feeds = entry.feeds(seed=0)
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == list(feeds)
    outs = sess.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outs)
