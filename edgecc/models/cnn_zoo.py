"""The "light" CNN models that the `onnx` wheel ships in ``onnx/backend/test/data/light/``.

They are the ONNX model-zoo classics with their weights replaced by ``ConstantOfShape`` nodes (every weight
tensor is one repeated value), so each file is a few KB to ~200 KB yet keeps the real architecture, op mix and
shapes. All are opset 9, IR version 3, take one float32 NCHW ``[1, 3, 224, 224]`` image and give 1000 class
scores. Next to each model, ``<name>_output_0.pb`` holds the expected output for the input the onnx backend test
feeds: ``arange(n).reshape(shape) / n`` (see `reference_feeds` / `reference_outputs`).

What onnx 1.23 ships (checked): alexnet, densenet121, inception_v1, inception_v2, resnet50, shufflenet,
squeezenet, vgg19, zfnet512. `light_models()` lists what is really in the installed wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

PREFIX = "light_"
# Range of the random BatchNormalization / Mul scale factors in `with_random_weights`. Residual nets grow their
# activations block after block; with the default range ResNet-50 and ShuffleNet saturate their softmax (one-hot,
# whatever the input), so they get smaller factors (ranges picked by checking that the output depends on the input).
SCALE_RANGE = {"resnet50": (0.2, 0.6), "shufflenet": (0.1, 0.4)}
DEFAULT_SCALE_RANGE = (0.5, 1.5)


@dataclass(frozen=True)
class ZooModel:
    name: str  # short name, e.g. "resnet50" (the file is light_<file_stem>.onnx)
    path: Path
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    reference_output: Path | None  # <stem>_output_0.pb, the expected output for `reference_feeds`


# Short names for the file stems (the files use Caffe2 model-zoo names).
_ALIASES = {"bvlc_alexnet": "alexnet"}


def light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


def _dims(value_info) -> tuple[int, ...]:
    # Symbolic dims (none in the shipped files) are taken as 1, as onnx's backend test does.
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value_info.type.tensor_type.shape.dim)


@lru_cache(maxsize=1)
def _catalog() -> dict[str, ZooModel]:
    import onnx

    catalog: dict[str, ZooModel] = {}
    directory = light_dir()
    if not directory.is_dir():
        return catalog
    for path in sorted(directory.glob(f"{PREFIX}*.onnx")):
        stem = path.stem[len(PREFIX) :]
        name = _ALIASES.get(stem, stem)
        model = onnx.load(str(path), load_external_data=False)
        initializers = {init.name for init in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            continue  # every shipped model has one image in, one score tensor out
        ref = path.with_name(f"{path.stem}_output_0.pb")
        catalog[name] = ZooModel(
            name=name,
            path=path,
            input_name=inputs[0].name,
            input_shape=_dims(inputs[0]),
            output_name=model.graph.output[0].name,
            output_shape=_dims(model.graph.output[0]),
            reference_output=ref if ref.is_file() else None,
        )
    return catalog


def light_models() -> dict[str, Path]:
    """Short name -> path of every light model in the installed onnx wheel (sorted by name)."""
    return {name: entry.path for name, entry in sorted(_catalog().items())}


def info(name: str) -> ZooModel:
    """Input/output names and shapes of one light model."""
    try:
        return _catalog()[name]
    except KeyError:
        known = ", ".join(sorted(_catalog())) or "none (is onnx installed?)"
        raise KeyError(f"unknown zoo model {name!r}; known: {known}") from None


def input_feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 image batch in [0, 1) for model `name`, the same for the same seed."""
    entry = info(name)
    rng = np.random.default_rng(seed)
    return {entry.input_name: rng.random(entry.input_shape, dtype=np.float32)}


def reference_feeds(name: str) -> dict[str, np.ndarray]:
    """The input that onnx's backend test feeds (``arange(n) / n``), for which `reference_outputs` holds the answer."""
    entry = info(name)
    n = int(np.prod(entry.input_shape))
    return {entry.input_name: (np.arange(n).reshape(entry.input_shape) / n).astype(np.float32)}


def reference_outputs(name: str) -> dict[str, np.ndarray] | None:
    """The expected output for `reference_feeds`, as shipped in the wheel (None if the .pb is missing)."""
    import onnx
    from onnx import numpy_helper

    entry = info(name)
    if entry.reference_output is None:
        return None
    tensor = onnx.TensorProto()
    tensor.ParseFromString(entry.reference_output.read_bytes())
    return {entry.output_name: numpy_helper.to_array(tensor)}


def copy_model(name: str, path, random_weights: bool = False, seed: int = 0) -> Path:
    """Write light model `name` to `path` (the exporter-style entry point the model registry uses).

    By default the shipped file is copied byte for byte. Its weights are all the constant 0.02, which makes the
    outputs independent of the input (softmax of equal scores: every class 0.001), so a numeric comparison of two
    runtimes on it proves little. ``random_weights=True`` writes `with_random_weights` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if random_weights:
        import onnx

        onnx.save_model(with_random_weights(name, seed), str(path))
    else:
        path.write_bytes(info(name).path.read_bytes())
    return path


def with_random_weights(name: str, seed: int = 0):
    """Light model `name` as an `onnx.ModelProto` whose ``ConstantOfShape`` weights are replaced by seeded random
    initializers, scaled so that activations stay O(1) through the whole network and the output depends on the
    input: conv/Gemm weights ~ N(0, 2/fan_in) (He), BatchNormalization scale and variance and per-channel ``Mul``
    factors ~ U(`SCALE_RANGE`), bias and mean ~ N(0, 0.05^2). Same seed, same model. Graph, names and
    opset are kept (the ``*__SHAPE`` initializers that fed ConstantOfShape are dropped)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(info(name).path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, tensor in enumerate(node.input):
            consumers.setdefault(tensor, []).append((node, index))
    aliases = {}  # Unsqueeze output -> its input (densenet/inception_v2 unsqueeze BN factors before Mul/Add)
    for node in graph.node:
        if node.op_type == "Unsqueeze":
            aliases[node.input[0]] = node.output[0]

    def role(tensor: str) -> tuple[str, int]:
        uses = consumers.get(tensor, [])
        if not uses and tensor in aliases:
            uses = consumers.get(aliases[tensor], [])
        elif tensor in aliases:
            uses = uses + consumers.get(aliases[tensor], [])
        for node, index in uses:
            if node.op_type == "Conv":
                return ("weight" if index == 1 else "bias"), 0
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                return ("weight" if index == 1 else "bias"), (1 if index == 1 and trans_b else 0)
            if node.op_type == "BatchNormalization":
                return {1: "scale", 2: "bias", 3: "bias", 4: "scale"}.get(index, "bias"), 0
            if node.op_type == "Mul":
                return "scale", 0
        return "bias", 0

    rng = np.random.default_rng(seed)
    new_nodes, new_inits, dropped = [], [], set()
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            new_nodes.append(node)
            continue
        shape = tuple(int(v) for v in numpy_helper.to_array(inits[node.input[0]]))
        kind, trans_b = role(node.output[0])
        if kind == "weight" and len(shape) >= 2:
            # Conv [O, I, kh, kw] and Gemm transB=1 [O, I]: fan-in is prod(shape[1:]); Gemm transB=0 [I, O]: shape[0].
            fan_in = shape[0] if (len(shape) == 2 and not trans_b) else int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))
        elif kind == "scale":
            value = rng.uniform(*SCALE_RANGE.get(name, DEFAULT_SCALE_RANGE), shape)
        else:
            value = rng.standard_normal(shape) * 0.05
        new_inits.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        dropped.add(node.input[0])
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    # IR version 3 (these files) wants every initializer declared as a graph input too.
    kept_inputs = [i for i in graph.input if i.name not in dropped]
    kept_inputs += [
        onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(init.dims)) for init in new_inits
    ]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    return model
