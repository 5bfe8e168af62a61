"""Weight quantization as first-class IR: schemes, RTN packing, the rewrite pass (IR before -> after), the
annotations through the pipeline down to the kernel, and numerics against numpy float64 and onnxruntime.

References are independent of the kernels: `QuantizedTensor.dequantize()` is plain numpy on the unpacked
codes (checked itself against a bit-by-bit unpacking here), and onnxruntime runs the float model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from edgecc.compress.quantize import quantize_weights
from edgecc.compress.recipe import load_recipe
from edgecc.compress.rtn import pack_bits, quantize_rtn, unpack_bits
from edgecc.compress.schemes import PER_CHANNEL, parse_scheme
from edgecc.errors import EdgeccError
from edgecc.ir_passes import compression as C

SCHEMES = ["w8", "w8a8", "w4g32", "w4g32-asym", "w4g64", "w3g64", "w3g64-asym", "w2g32-asym", "w8-asym"]


# ------------------------------------------------------------------------------------------ schemes


@pytest.mark.parametrize("text, bits, group, sym, act, storage", [
    ("w8", 8, PER_CHANNEL, True, 0, "int8"),
    ("w8a8", 8, PER_CHANNEL, True, 8, "int8"),
    ("w8-asym", 8, PER_CHANNEL, False, 0, "uint8"),
    ("w4g32", 4, 32, True, 0, "uint32"),
    ("W4G128-ASYM", 4, 128, False, 0, "uint32"),
    ("w4g64-sym", 4, 64, True, 0, "uint32"),
    ("w3g64", 3, 64, True, 0, "uint32"),
    ("w4", 4, PER_CHANNEL, True, 0, "uint32"),
])
def test_parse_scheme(text, bits, group, sym, act, storage):
    s = parse_scheme(text)
    assert (s.bits, s.group_size, s.symmetric, s.act_bits, s.storage_dtype) == (bits, group, sym, act, storage)
    assert parse_scheme(s.name) == s
    attrs = s.to_attrs()
    assert attrs["kind"] == "quant" and attrs["scheme"] == s.name and attrs["axis"] == 0


@pytest.mark.parametrize("text", ["w9", "w1", "w4g30", "x4", "w4a8", "w8a8-asym", "w4g32-foo", ""])
def test_parse_scheme_rejects(text):
    with pytest.raises(EdgeccError):
        parse_scheme(text)


def test_storage_shapes_and_bytes():
    s = parse_scheme("w4g32")
    assert s.storage_shapes(576, 1536) == {"weight": ((72, 1536), "uint32"), "scales": ((18, 1536), "float32")}
    assert s.packed_nbytes(576, 1536) == 72 * 1536 * 4 + 18 * 1536 * 4
    a = parse_scheme("w3g64-asym").storage_shapes(128, 8)
    assert a == {"weight": ((12, 8), "uint32"), "scales": ((2, 8), "float32"), "zeros": ((2, 8), "uint8")}
    assert parse_scheme("w4g64").check_shape(96, 8) is not None  # 96 not a multiple of 64


# ------------------------------------------------------------------------------------------ RTN


def _unpack_bitwise(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Slow, obviously-correct reference: read the little-endian bitstream one bit at a time."""
    out = np.zeros((k, words.shape[1]), np.int64)
    for i in range(k):
        for b in range(bits):
            pos = i * bits + b
            out[i] |= ((words[pos // 32].astype(np.int64) >> (pos % 32)) & 1) << b
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (64, 5))
    words = pack_bits(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (64 * bits // 32, 5)
    np.testing.assert_array_equal(unpack_bits(words, bits, 64), codes)
    np.testing.assert_array_equal(_unpack_bitwise(words, bits, 64), codes)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rtn_dequantize_matches_float64_formula(scheme):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column must not divide by zero
    qt = quantize_rtn(w, scheme)
    s = qt.scheme
    g = s.group_for(128)
    shapes = s.storage_shapes(128, 24)
    assert qt.weight.shape == shapes["weight"][0] and str(qt.weight.dtype) == shapes["weight"][1]
    assert qt.scales.shape == (128 // g, 24) and qt.scales.dtype == np.float32
    assert (qt.zeros is None) == s.symmetric
    codes = qt.codes() if s.bits == 8 else _unpack_bitwise(qt.weight, s.bits, 128)
    lo, hi = ((-127, 127) if s.bits == 8 and s.symmetric else (0, (1 << s.bits) - 1))
    assert codes.min() >= lo and codes.max() <= hi
    zero = (np.repeat(qt.zeros.astype(np.float64), g, axis=0) if qt.zeros is not None else s.zero_offset)
    expected = (codes - zero) * np.repeat(qt.scales.astype(np.float64), g, axis=0)
    np.testing.assert_array_equal(qt.dequantize(), expected)
    # round to nearest: every weight within half a step (asymmetric: a step, the zero point is rounded too)
    step = np.repeat(qt.scales.astype(np.float64), g, axis=0)
    bound = step * (0.5 if s.symmetric else 1.0) + 1e-6
    assert (np.abs(qt.dequantize() - w) <= bound).all()
    assert np.all(qt.dequantize()[:, 3] == 0.0)
    assert qt.nbytes == s.packed_nbytes(128, 24) and qt.original_nbytes == w.nbytes


# ------------------------------------------------------------------------------------------ recipes


def test_recipe_scheme_string():
    r = load_recipe("w4g32")
    assert r.choose("fc.weight", (64, 128))[0] == parse_scheme("w4g32")
    assert r.choose("tiny.weight", (16, 16))[0] is None  # 256 < min_params
    sch, why = r.choose("odd.weight", (96, 128))  # 96 = 3 groups of 32: fine
    assert sch.name == "w4g32"
    sch, why = load_recipe("w4g64").choose("odd.weight", (96, 128))  # not a multiple of 64 -> fallback w8
    assert sch.name == "w8" and "fallback" in why


def test_recipe_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"default": "w4g32", "min_params": 0,
                             "layers": {"*lm_head*": "w8", "*embed*": "none", "*.q_proj.*": "w4g128-asym"}}))
    r = load_recipe(p)
    assert r.choose("model.lm_head.weight", (64, 64))[0].name == "w8"
    assert r.choose("model.embed.weight", (64, 64))[0] is None
    assert r.choose("l0.q_proj.weight", (128, 64))[0].name == "w4g128-asym"
    assert r.choose("l0.up.weight", (4, 32))[0].name == "w8"  # 4 inputs: no group of 32 fits -> fallback w8
    t = tmp_path / "r.toml"
    t.write_text('default = "w8"\n[layers]\n"fc2*" = "w3g64"\n')
    assert load_recipe(t).choose("fc2.weight", (128, 64))[0].name == "w3g64"
    with pytest.raises(EdgeccError):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"defualt": "w8"}))
    with pytest.raises(EdgeccError):
        load_recipe(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ pass: IR before -> after


K, H, N = 64, 128, 32


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32),
        "b1": (0.05 * rng.standard_normal(H)).astype(np.float32),
        "w2": (rng.standard_normal((H, N)) / np.sqrt(H)).astype(np.float32),
        "t": (rng.standard_normal((N, 4))).astype(np.float32),  # tiny: stays float
    }


def _before(x_shape=(2, K)):
    """main(x, w1, b1, w2, t) = relu(x @ w1 + b1) @ w2 @ t"""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w1 = relax.Var("w1", relax.TensorType((K, H), "float32"))
    b1 = relax.Var("b1", relax.TensorType((H,), "float32"))
    w2 = relax.Var("w2", relax.TensorType((H, N), "float32"))
    t = relax.Var("t", relax.TensorType((N, 4), "float32"))
    with bb.function("main", [x, w1, b1, w2, t], attrs={"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, w1))
            h = bb.emit(relax.op.add(h, b1))
            h = bb.emit(relax.op.nn.relu(h))
            y = bb.emit(relax.op.matmul(h, w2))
            y = bb.emit(relax.op.matmul(y, t))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    return bb.get()


def _expected(scheme, params_after, x_shape=(2, K)):
    """The module quantize_weights must produce, written by hand."""
    s = parse_scheme(scheme)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    pvars = {n: relax.Var(n.replace(".", "_"), relax.TensorType(a.shape, str(a.dtype))) for n, a in params_after}
    by = dict(params_after)

    def ann(name, k, n):
        qt_bytes = sum(by[p].nbytes for p in by if p.startswith(name + "."))
        return dict(s.to_attrs(), in_features=k, out_features=n, name=name, orig_dtype="float32",
                    orig_bytes=k * n * 4, packed_bytes=qt_bytes)

    def qmm(inp, name, k, n):
        z = pvars.get(f"{name}.zeros")
        return C.quantized_matmul(inp, pvars[f"{name}.qweight"], pvars[f"{name}.scales"], z, ann(name, k, n))

    with bb.function("main", [x, *pvars.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            h = bb.emit(qmm(x, "w1", K, H))
            h = bb.emit(relax.op.add(h, pvars["b1"]))
            h = bb.emit(relax.op.nn.relu(h))
            y = bb.emit(qmm(h, "w2", H, N))
            y = bb.emit(relax.op.matmul(y, pvars["t"]))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    return bb.get()


def _named(ws):
    return [(n, ws[n]) for n in ("w1", "b1", "w2", "t")]


@pytest.mark.parametrize("scheme", ["w8", "w4g32", "w4g32-asym", "w3g64"])
def test_quantize_pass_ir_before_after(scheme):
    ws = _weights()
    mod, params, report = quantize_weights(_before(), _named(ws), scheme)
    s = parse_scheme(scheme)
    # params: each quantized weight replaced in place by its packed tensors, in the order main takes them
    names = [n for n, _ in params]
    packed = ["qweight", "scales"] + ([] if s.symmetric else ["zeros"])
    assert names == [f"w1.{p}" for p in packed] + ["b1"] + [f"w2.{p}" for p in packed] + ["t"]
    dtypes = dict((n, (str(a.dtype), a.shape)) for n, a in params)
    assert dtypes["w1.qweight"] == (s.storage_dtype, s.stored_shapes(K, H)["weight"][0])
    assert dtypes["w2.scales"] == ("float32", s.stored_shapes(H, N)["scales"][0])
    if not s.symmetric:
        assert dtypes["w1.zeros"][0] == "uint8"
    # no float copy of a quantized weight survives, in the params or in the IR
    assert not any(a.dtype == np.float32 and a.shape in ((K, H), (H, N)) for _, a in params)
    # the IR is exactly the hand-written one (TVM pass-test style)
    tvm.ir.assert_structural_equal(mod, _expected(scheme, params))
    ops = C.annotated_ops(mod)
    assert [op["name"] for op in ops] == ["w1", "w2"]
    assert all(op["scheme"] == s.name and op["bits"] == s.bits and op["group_size"] == s.group_size
               and op["symmetric"] == s.symmetric and op["storage"] == s.storage_dtype for op in ops)
    assert [op["name"] for op in report.ops] == ["w1", "w2"]
    assert [sk["name"] for sk in report.skipped] == ["t"] and "tiny" in report.skipped[0]["reason"]
    # the quantized tensors are exactly RTN's
    qt = quantize_rtn(ws["w1"], s)
    np.testing.assert_array_equal(dict(params)["w1.qweight"], qt.tensors()["weight"])


def test_quantize_pass_keeps_float_copy_when_weight_has_other_uses():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, K), "float32"))
    w = relax.Var("w", relax.TensorType((K, K), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            z = bb.emit(relax.op.add(y, relax.op.sum(w, axis=[0], keepdims=True)))
            gv = bb.emit_output(z)
        bb.emit_func_output(gv)
    w_np = np.random.default_rng(0).standard_normal((K, K)).astype(np.float32)
    mod, params, report = quantize_weights(bb.get(), [("w", w_np)], "w8")
    assert [n for n, _ in params] == ["w", "w.qweight", "w.scales"]
    assert report.kept_float_copies == ["w"]


def test_annotations_survive_passes_down_to_the_kernel():
    from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, lower_passes, schedule_passes
    from edgecc.targets.registry import get_target

    spec = get_target("host")
    mod, params, _ = quantize_weights(_before(), _named(_weights()), "w4g32")
    # generic passes that run before lowering keep the op and its attrs
    for p in (relax.transform.LiftTransformParams(), relax.transform.FoldConstant(),
              relax.transform.DeadCodeElimination(), relax.transform.CanonicalizeBindings(),
              relax.transform.EliminateCommonSubexpr()):
        after = p(mod)
        assert C.annotated_ops(after) == C.annotated_ops(mod), p
    with spec.tvm():
        legal = tvm.transform.Sequential(legalize_and_fuse_passes() + schedule_passes(spec))(mod)
        final = tvm.transform.Sequential(lower_passes())(legal)
    for stage in (legal, final):
        kernels = C.annotated_kernels(stage)
        assert len(kernels) == 2, stage
        for name, attrs in kernels.items():
            assert attrs["scheme"] == "w4g32" and attrs["bits"] == 4 and attrs["storage"] == "uint32"
            func = stage[name]
            assert bool(func.attrs["tirx.is_scheduled"]) and int(func.attrs["op_pattern"]) == C.OP_PATTERN_OPAQUE
            dtypes = [str(p.ty.dtype) for p in func.params]
            assert dtypes[1] == "uint32"  # the kernel reads the packed storage itself
            # no buffer anywhere in the kernel is as big as the float weight
            k, n = attrs["in_features"], attrs["out_features"]
            found = []
            tvm_ffi.structural_walk(func, (tirx.Var, found.append), order="post")
            bufs = [v.ty for v in found if tirx.buffer.is_buffer_var(v)]
            assert any(str(b.dtype) == "uint32" for b in bufs)
            big = [b for b in bufs if "float" in str(b.dtype)
                   and int(np.prod([int(d) for d in b.shape])) >= k * n]
            assert not big, big
    # the Relax side has no float [K, N] tensor left either
    text = final["main"].script()
    assert "(64, 128), dtype=\"float32\"" not in text.replace("R.Tensor", "")


# ------------------------------------------------------------------------------------------ numerics


def _ref_mlp(x, ws, scheme, quant=True):
    def deq(w):
        return quantize_rtn(w, scheme).dequantize() if quant else w.astype(np.float64)

    def mm(a, w):
        if quant and parse_scheme(scheme).act_bits == 8:
            return _w8a8_ref(a, w)
        return a @ deq(w)

    h = np.maximum(mm(x.astype(np.float64), ws["w1"]) + ws["b1"], 0)
    return mm(h, ws["w2"]) @ ws["t"].astype(np.float64)


def _w8a8_ref(a, w):
    qt = quantize_rtn(w, "w8a8")
    a32 = a.astype(np.float32)
    amax = np.abs(a32).max(axis=-1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    xq = np.clip(np.rint(a32 / sx), -127, 127).astype(np.int64)
    acc = xq @ qt.codes()
    return acc.astype(np.float64) * sx.astype(np.float64) * qt.scales.astype(np.float64)


def _compile_and_run(mod, inputs, params):
    from edgecc.ir_passes.pipeline import relax_pipeline
    from edgecc.targets.registry import get_target

    spec = get_target("host")
    ex = tvm.compile(mod, target=spec.tvm(), relax_pipeline=relax_pipeline(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.tensor(np.ascontiguousarray(a)) for _, a in params]
    return vm["main"](*args).numpy()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("x_shape", [(1, K), (2, 3, K), (4, 8, K)], ids=["gemv", "batched", "panel"])
def test_quantized_module_matches_float64_dequant_reference(scheme, x_shape):
    ws = _weights()
    mod, params, _ = quantize_weights(_before(x_shape), _named(ws), scheme)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    got = _compile_and_run(mod, [x], params)
    ref = _ref_mlp(x, ws, scheme)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _mlp_onnx(path, batch=2):
    from conftest import export_mlp_onnx

    return export_mlp_onnx(path, K, H, N, batch)


def _onnx_mlp_ref(x, w, scheme):
    deq = (lambda a: quantize_rtn(a, scheme).dequantize())
    h = np.maximum(x.astype(np.float64) @ deq(w["w1"]) + w["b1"], 0)
    if parse_scheme(scheme).act_bits == 8:
        h = np.maximum(_w8a8_ref(x.astype(np.float64), w["w1"]) + w["b1"], 0)
        return _w8a8_ref(h, w["w2t"]) + w["b2"]
    return h @ deq(w["w2t"]) + w["b2"]


# loose bounds against the float model: the quantization error itself (cosine of the outputs)
_COSINE_VS_FP32 = {"w8": 0.9999, "w8a8": 0.999, "w4g32": 0.99, "w4g32-asym": 0.99, "w3g64": 0.95}


@pytest.mark.parametrize("scheme", list(_COSINE_VS_FP32))
def test_build_quantized_onnx_mlp(scheme, tmp_path):
    import onnxruntime as ort

    from edgecc.build import build_artifact
    from edgecc.runtime_bridge.host import load_artifact
    from edgecc.runtime_bridge.params_file import read_params

    onnx_path, w = _mlp_onnx(tmp_path / "mlp.onnx")
    out = tmp_path / "art"
    result = build_artifact(onnx_path, out, target="host", quantize=scheme)
    comp = result.manifest["compression"]
    assert comp["scheme"] == parse_scheme(scheme).name
    assert [(op["name"], op["in_features"], op["out_features"]) for op in comp["annotated_ops"]] == [
        ("fc1.weight", K, H), ("fc2.weight", H, N)]  # fc2: the Gemm's transposed B, traced to its initializer
    assert comp["packed_bytes"] == sum(parse_scheme(scheme).packed_nbytes(k, n) for k, n in ((K, H), (H, N)))
    stored = read_params(out / "params.bin")
    assert not any(a.dtype == np.float32 and a.size >= H * N for _, a in stored)  # no float weight copy
    assert result.manifest["memory"]["weights_bytes"] == sum(a.nbytes for _, a in stored)

    x = np.random.default_rng(5).standard_normal((2, K)).astype(np.float32)
    got = load_artifact(out).run({"x": x})["y"]
    ref = _onnx_mlp_ref(x, w, scheme)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    fp32 = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cos = float(np.dot(got.ravel(), fp32.ravel()) / np.linalg.norm(got) / np.linalg.norm(fp32))
    assert cos > _COSINE_VS_FP32[scheme], cos


def test_cli_build_quantize_and_inspect(cli, tmp_path):
    onnx_path, _ = _mlp_onnx(tmp_path / "mlp.onnx")
    out = tmp_path / "art"
    r = cli("build", onnx_path, "-o", out, "--quantize", "w4g32-asym")
    assert r.exit_code == 0, r.output
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "compression: w4g32-asym (2 annotated ops)" in r.output
    assert "fc1.weight" in r.output and "fc2.weight" in r.output and "uint32" in r.output
    for bad, message in (("w5g7", "group size 7"), ("int4", "neither a scheme nor a recipe file")):
        r = cli("build", onnx_path, "-o", tmp_path / "bad", "--quantize", bad)
        assert r.exit_code == 2 and message in r.output and "load" not in r.output, r.output


@pytest.mark.parametrize("target,scheme", [("arm-neon", "w4g32"), ("arm-neon", "w8a8"), ("arm-dotprod", "w8a8"),
                                           ("arm-i8mm", "w8a8")])
def test_arm_neon_build_quantized(tmp_path, target, scheme):
    """Cross builds under qemu; w8a8 takes the generic kernel on plain NEON, the sdot kernel with dotprod and
    the smmla kernel with i8mm."""
    from edgecc.build import build_artifact
    from edgecc.targets.registry import get_target

    spec = get_target(target)
    status = spec.sdk_status()
    if not status.can_build:
        pytest.skip("no aarch64 cross toolchain")
    onnx_path, w = _mlp_onnx(tmp_path / "mlp.onnx")
    out = tmp_path / "arm"
    result = build_artifact(onnx_path, out, target=target, quantize=scheme)
    assert len(result.manifest["compression"]["annotated_ops"]) == 2
    assert (out / "model.so").read_bytes()[:4] == b"\x7fELF"
    if target == "arm-i8mm":
        import subprocess

        asm = subprocess.run([*spec.objdump, str(out / "model.so")], capture_output=True, text=True).stdout
        assert "smmla\t" in asm
    if not status.can_run:
        pytest.skip("built; no qemu-aarch64 runtime to run it")
    from edgecc.runtime_bridge.emulated import run_emulated

    x = np.random.default_rng(5).standard_normal((2, K)).astype(np.float32)
    (got,) = run_emulated(out, spec, [x])
    ref = _onnx_mlp_ref(x, w, scheme)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_stored_layout_is_tile_major():
    """params.bin holds [N/T, rows, T] tiles (T = 64 when it divides N): tile c holds columns c*T..c*T+T-1."""
    from edgecc.compress.schemes import STORAGE_TILE

    w = np.random.default_rng(3).standard_normal((96, 192)).astype(np.float32)
    for scheme in ("w4g32-asym", "w8"):
        qt = quantize_rtn(w, parse_scheme(scheme))
        stored = qt.tensors()
        shapes = parse_scheme(scheme).stored_shapes(96, 192)
        for name, arr in stored.items():
            logical = getattr(qt, {"weight": "weight", "scales": "scales", "zeros": "zeros"}[name])
            assert arr.shape == shapes[name][0] == (192 // STORAGE_TILE, logical.shape[0], STORAGE_TILE)
            for c in range(arr.shape[0]):
                np.testing.assert_array_equal(arr[c], logical[:, c * STORAGE_TILE:(c + 1) * STORAGE_TILE])
    # N not a multiple of the tile: one tile of all N columns (row-major bytes)
    qt = quantize_rtn(w[:, :40], parse_scheme("w8"))
    assert qt.tensors()["weight"].shape == (1, 96, 40)
