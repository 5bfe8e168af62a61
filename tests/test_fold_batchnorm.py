"""edgecc.ir_passes.fold_batchnorm: inference BatchNorm -> per-channel scale/shift, Sum(stack) -> add.

IR before -> after (no batch_norm/stack/sum left; the convolution, BatchNorm, residual add and ReLU end up
in one fused PrimFunc), and numerics of the whole pipeline against numpy in float64.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax, tirx  # noqa: E402

from edgecc.ir_passes.fold_batchnorm import fold_batchnorm_pass  # noqa: E402
from edgecc.ir_passes.pipeline import legalize_and_fuse_passes, relax_pipeline  # noqa: E402
from edgecc.schedules import schedule_report  # noqa: E402
from edgecc.targets.registry import get_target  # noqa: E402

R = relax.op
HOST = get_target("host")
EPS = 1e-3


def _resnet_block(c=5, f=24, h=9, w=7, training=False):
    """conv -> BatchNorm -> ONNX-style Sum(stack) with a second input -> relu."""
    bb = relax.BlockBuilder()
    shapes = {"x": (1, c, h, w), "k": (f, c, 3, 3), "g": (f,), "b": (f,), "m": (f,), "v": (f,), "r": (1, f, h, w)}
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in shapes.items()]
    x, k, g, b, m, v, r = params
    with bb.function("main", params):
        with bb.dataflow():
            conv = bb.emit(R.nn.conv2d(x, k, padding=1))
            bn = bb.emit(R.nn.batch_norm(conv, g, b, m, v, axis=1, epsilon=EPS, training=training))
            y = bb.emit(relax.TupleGetItem(bn, 0))
            stacked = bb.emit(R.stack(relax.Tuple([bb.emit(R.broadcast_to(y, (1, f, h, w))),
                                                   bb.emit(R.broadcast_to(r, (1, f, h, w)))]), axis=0))
            total = bb.emit(R.sum(stacked, axis=[0]))
            out = bb.emit_output(R.nn.relu(total))
        bb.emit_func_output(out)
    return bb.get(), shapes


def _ops(mod) -> set[str]:
    names = set()

    def visit(call):
        if isinstance(call.op, tvm.ir.Op):
            names.add(call.op.name)

    relax.analysis.post_order_visit(mod["main"].body, lambda e: visit(e) if isinstance(e, relax.Call) else None)
    return names


def test_ir_before_after():
    mod, _ = _resnet_block()
    before = _ops(mod)
    assert {"relax.nn.batch_norm", "relax.stack", "relax.sum"} <= before
    after_mod = fold_batchnorm_pass()(mod)
    after = _ops(after_mod)
    assert not after & {"relax.nn.batch_norm", "relax.stack", "relax.sum"}, after
    assert {"relax.nn.conv2d", "relax.multiply", "relax.add", "relax.sqrt", "relax.nn.relu"} <= after
    # after fusion: conv + scale/shift + residual + relu are one kernel, scheduled by the conv rule
    fused = tvm.transform.Sequential(legalize_and_fuse_passes())(mod)
    conv_funcs = [gv.name_hint for gv, f in fused.functions_items()
                  if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(conv_funcs) == 1 and "relu" in conv_funcs[0] and "add" in conv_funcs[0], conv_funcs
    assert not any("batch_norm" in gv.name_hint for gv, _ in fused.functions_items())
    from edgecc.schedules import cpu_schedule_passes

    with HOST.tvm():
        sched = tvm.transform.Sequential(cpu_schedule_passes(HOST))(fused)
    assert schedule_report(sched)[conv_funcs[0]] == "conv2d"


def test_training_batchnorm_left_alone():
    mod, _ = _resnet_block(training=True)
    assert "relax.nn.batch_norm" in _ops(fold_batchnorm_pass()(mod))


def _ref64(x, k, g, b, m, v, r):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, k.shape[0], h, w))
    for ry in range(3):
        for rx in range(3):
            conv += np.einsum("nchw,fc->nfhw", xp[:, :, ry:ry + h, rx:rx + w], k[:, :, ry, rx])
    ch = (1, -1, 1, 1)
    y = (conv - m.reshape(ch)) / np.sqrt(v.reshape(ch) + EPS) * g.reshape(ch) + b.reshape(ch)
    return np.maximum(y + r, 0)


def test_numerics_against_numpy_float64():
    mod, shapes = _resnet_block()
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal(s).astype("float32") for n, s in shapes.items()}
    inputs["v"] = np.abs(inputs["v"]) + 0.1
    ex = tvm.compile(mod, target=HOST.tvm(), relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()]).numpy()
    expect = _ref64(*[a.astype("float64") for a in inputs.values()])
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)


def _conv_bn_relu(c=5, f=24, h=9, w=7):
    """main(x | k, g, b, m, v): conv -> inference BatchNorm -> relu, with the conv and BN tensors as weights."""
    bb = relax.BlockBuilder()
    shapes = {"x": (1, c, h, w), "k": (f, c, 3, 3), "g": (f,), "b": (f,), "m": (f,), "v": (f,)}
    params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in shapes.items()]
    x, k, g, b, m, v = params
    with bb.function("main", params, attrs={"num_input": 1}):
        with bb.dataflow():
            conv = bb.emit(R.nn.conv2d(x, k, padding=1))
            bn = bb.emit(R.nn.batch_norm(conv, g, b, m, v, axis=1, epsilon=EPS, training=False))
            out = bb.emit_output(R.nn.relu(bb.emit(relax.TupleGetItem(bn, 0))))
        bb.emit_func_output(out)
    return bb.get(), shapes


def test_batchnorm_statistics_are_computed_at_build_time():
    """The build lifts BatchNorm's weight-only arithmetic (scale = g / sqrt(v + eps), shift = b - m * scale) out
    of the deployed function: before the fold it could not (one batch_norm call also takes the activations),
    so ResNet-50 ran 66 tiny kernels per inference on its weights."""
    from edgecc.build import _run_weight_transforms, _split_transform_params

    mod, shapes = _conv_bn_relu()
    deploy, transform = _split_transform_params(mod)
    assert transform is not None
    deployed_ops = _ops(deploy)
    assert not deployed_ops & {"relax.nn.batch_norm", "relax.sqrt", "relax.divide", "relax.negative"}, deployed_ops
    assert {"relax.nn.conv2d", "relax.multiply", "relax.add", "relax.nn.relu"} <= deployed_ops
    main = deploy["main"]
    assert int(main.attrs["num_input"]) == 1
    # the weights the deployed function takes are k plus the two folded [1, f, 1, 1] vectors (scale, shift)
    weight_shapes = sorted(tuple(int(d) for d in p.ty.shape) for p in main.params[1:])
    assert weight_shapes == sorted([(24, 5, 3, 3), (1, 24, 1, 1), (1, 24, 1, 1)]), weight_shapes

    rng = np.random.default_rng(1)
    x, k, g, b, m = (rng.standard_normal(shapes[n]).astype("float32") for n in "xkgbm")
    v = (np.abs(rng.standard_normal(shapes["v"])) + 0.1).astype("float32")
    weights = _run_weight_transforms(transform, [k, g, b, m, v])
    scale64 = g.astype("float64") / np.sqrt(v.astype("float64") + EPS)
    folded = [w.reshape(-1) for w in weights if w.shape == (1, 24, 1, 1)]
    assert any(np.allclose(f, scale64, rtol=1e-5, atol=1e-6) for f in folded)
    assert any(np.allclose(f, b - m * scale64, rtol=1e-5, atol=1e-5) for f in folded)
    ex = tvm.compile(deploy, target=HOST.tvm(), relax_pipeline=relax_pipeline(HOST))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    expect = np.maximum(_ref64(*[a.astype("float64") for a in (x, k, g, b, m, v)], r=0.0), 0)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)
