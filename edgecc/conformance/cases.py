"""The ONNX node conformance cases: where they are, what each tests, and how a case becomes a static model.

Data. The `onnx` wheel ships the case *generators* (`onnx.backend.test.case.node`), not always the data
(`onnx/backend/test/data/node` is absent from recent wheels). `cases_dir()` uses, in order: an explicit
directory, the wheel's `data/node` when present, else a cache at `$EDGECC_CACHE/onnx-node-cases/onnx-<ver>/`
(default `~/.cache/edgecc`), generated once from the wheel in about 15 s with the same writer as
`python -m onnx.backend.test.cmd_tools generate-data` (model.onnx + test_data_set_*/input_*.pb/output_*.pb).

Op of a case. A case tests one op: the op of its single non-`Constant` node; `*_expanded` cases (the op's
function body written out) are counted under the op of the case they expand.

Static model ("frozen" inputs). edgecc builds static-shape artifacts, so each case is built for the input
shapes of its data set (graph input shapes are rewritten to them). Inputs that the ONNX spec defines as
shapes, axes, sizes, counts or modes — the `(op, input index)` pairs in `FROZEN_INPUTS`, e.g. Reshape's
`shape`, Slice's `starts/ends/axes/steps`, Reduce*'s `axes`, TopK's `K` — are turned into initializers
holding the data set's values (when they are small: at most `FREEZE_MAX_ELEMENTS` elements); an
`*_expanded` case freezes the same inputs as its base case (`base_frozen_names`). That is what a
real exported model contains, and what `tvm-0.27-facts.md` calls "frozen"; data inputs (Gather indices,
Clip bounds, quantization scales, ...) always stay runtime inputs. `strict=True` freezes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.errors import EdgeccError

FREEZE_MAX_ELEMENTS = 16

_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

#: (op_type -> input indices) that the spec defines as shape/axes/size/count/mode inputs.
FROZEN_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (1,) for op in _REDUCE},
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Resize": (1, 2, 3), "Upsample": (1,),
    "ConstantOfShape": (0,), "TopK": (1,), "Split": (1,), "OneHot": (1, 2), "Range": (0, 1, 2),
    "CumSum": (1,), "CumProd": (1,), "CenterCropPad": (1,), "Trilu": (1,), "Col2Im": (1, 2), "MaxUnpool": (2,),
    "AffineGrid": (1,), "DFT": (1, 2), "STFT": (1, 3), "MelWeightMatrix": (0, 1, 2, 3, 4),
    "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,), "Dropout": (1, 2),
    "NonMaxSuppression": (2, 3, 4), "SplitToSequence": (1,),
}

_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


def _default_cache() -> Path:
    env = os.environ.get("EDGECC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgecc"


def generate_cases(out_dir: Path) -> Path:
    """Write every node case of the installed onnx wheel under out_dir (atomically); returns out_dir."""
    import onnx.backend.test.case.node as node_cases

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".node-", dir=out_dir.parent))
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            cases = node_cases.collect_testcases(None)
        for case in cases:
            case_dir = tmp / case.name
            case_dir.mkdir()
            (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
            for i, (inputs, outputs) in enumerate(case.data_sets):
                ds = case_dir / f"test_data_set_{i}"
                ds.mkdir()
                for kind, values, infos in (("input", inputs, case.model.graph.input),
                                            ("output", outputs, case.model.graph.output)):
                    for j, value in enumerate(values):
                        (ds / f"{kind}_{j}.pb").write_bytes(_serialize(value, infos[j]))
        if out_dir.exists():  # another process generated it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _serialize(value, info: onnx.ValueInfoProto) -> bytes:
    t = info.type
    if t.HasField("sequence_type"):
        return numpy_helper.from_list(value, info.name).SerializeToString()
    if t.HasField("optional_type"):
        return numpy_helper.from_optional(value, info.name).SerializeToString()
    if t.HasField("map_type"):
        return numpy_helper.from_dict(value, info.name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(value, info.name).SerializeToString()


def cases_dir(explicit: str | Path | None = None, generate: bool = True) -> Path:
    """The directory holding one sub-directory per node case (see the module docstring for the order)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise EdgeccError(f"conformance case directory '{path}' does not exist",
                              "pass a directory like onnx/backend/test/data/node, or omit --cases-dir")
        return path
    wheel = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if wheel.is_dir() and any(wheel.iterdir()):
        return wheel
    cached = _default_cache() / "onnx-node-cases" / f"onnx-{onnx.__version__}"
    if not cached.is_dir():
        if not generate:
            raise EdgeccError(f"no ONNX node cases at {cached}", "run `edgecc validate` once to generate them")
        generate_cases(cached)
    return cached


@dataclass(frozen=True)
class Case:
    name: str
    dir: Path
    op: str  # the op under test ("domain::Op" outside the default domain)
    expanded: bool

    @property
    def model_path(self) -> Path:
        return self.dir / "model.onnx"

    def data_sets(self) -> list[Path]:
        return sorted(self.dir.glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))


def _op_of(model: onnx.ModelProto) -> str | None:
    nodes = [n for n in model.graph.node if n.op_type != "Constant"] or list(model.graph.node)
    if len(nodes) != 1:
        return None
    node = nodes[0]
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def discover(directory: Path, pattern: str | None = None) -> list[Case]:
    """All cases under `directory` (sorted by name), optionally filtered by `-k`-style `pattern`.

    `pattern`: comma-separated terms; a case is kept when any term is a substring of its name or equals its
    op (case-insensitive), and no `not:TERM` term matches it.
    """
    dirs = sorted(p for p in Path(directory).iterdir() if (p / "model.onnx").is_file())
    ops: dict[str, str | None] = {}
    for d in dirs:
        try:
            model = onnx.load(str(d / "model.onnx"), load_external_data=False)
            ops[d.name] = _op_of(model)
        except Exception:  # noqa: BLE001 - a broken case file is reported when it runs
            ops[d.name] = None
    cases = []
    for d in dirs:
        expanded = bool(_EXPANDED.search(d.name))
        op = ops[d.name]
        if expanded or op is None:
            base = _EXPANDED.sub("", d.name)
            op = ops.get(base) or op or d.name.removeprefix("test_")
        cases.append(Case(d.name, d, op, expanded))
    return [c for c in cases if matches(c, pattern)]


def matches(case: Case, pattern: str | None) -> bool:
    if not pattern:
        return True
    terms = [t.strip().lower() for t in pattern.split(",") if t.strip()]
    include = [t for t in terms if not t.startswith("not:")]
    exclude = [t[4:] for t in terms if t.startswith("not:")]
    name, op = case.name.lower(), case.op.lower()

    def hit(t: str) -> bool:
        return t in name or t == op

    return (not include or any(hit(t) for t in include)) and not any(hit(t) for t in exclude)


# ------------------------------------------------------------------------------------- data sets


def read_value(path: Path, info: onnx.ValueInfoProto):
    """One input_*.pb / output_*.pb as numpy (tensors) or the raw proto's Python value (sequences etc.)."""
    data = path.read_bytes()
    t = info.type
    if t.HasField("tensor_type"):
        proto = onnx.TensorProto()
        proto.ParseFromString(data)
        return numpy_helper.to_array(proto)
    if t.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if t.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    raise EdgeccError(f"{path.name}: unsupported value type", None)


@dataclass
class DataSet:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    name: str = ""
    frozen: dict[str, np.ndarray] = field(default_factory=dict)


def read_data_set(model: onnx.ModelProto, ds_dir: Path) -> DataSet:
    """Inputs are matched to the graph inputs that are not initializers, in order (as onnx's runner does)."""
    inits = {t.name for t in model.graph.initializer}
    in_infos = [v for v in model.graph.input if v.name not in inits]
    inputs = {}
    for j, info in enumerate(in_infos):
        path = ds_dir / f"input_{j}.pb"
        if path.exists():
            inputs[info.name] = read_value(path, info)
    outputs = {}
    for j, info in enumerate(model.graph.output):
        path = ds_dir / f"output_{j}.pb"
        if path.exists():
            outputs[info.name] = read_value(path, info)
    return DataSet(inputs, outputs, ds_dir.name)


def frozen_input_names(model: onnx.ModelProto, inputs: dict[str, object]) -> list[str]:
    """Graph inputs used only at spec-defined shape/axes positions (FROZEN_INPUTS) and small enough."""
    uses: dict[str, list[bool]] = {}
    for node in model.graph.node:
        positions = FROZEN_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        for idx, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append(idx in positions)
    out = []
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray) or value.size > FREEZE_MAX_ELEMENTS:
            continue
        if uses.get(name) and all(uses[name]):
            out.append(name)
    return out


def base_frozen_names(case_dir: Path) -> set[str]:
    """For an `*_expanded` case: the graph inputs its base case's op takes at FROZEN_INPUTS positions.

    An expanded case is the op's function body: its graph inputs are the op's inputs (same names), but they
    feed Shape/Slice/Size/... nodes rather than the op, so the node rule of `frozen_input_names` misses them.
    """
    case_dir = Path(case_dir)
    base = case_dir.parent / _EXPANDED.sub("", case_dir.name)
    if base == case_dir or not (base / "model.onnx").is_file():
        return set()
    try:
        model = onnx.load(str(base / "model.onnx"), load_external_data=False)
    except Exception:  # noqa: BLE001
        return set()
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    if len(nodes) != 1 or nodes[0].domain not in ("", "ai.onnx"):
        return set()
    positions = FROZEN_INPUTS.get(nodes[0].op_type, ())
    return {name for i, name in enumerate(nodes[0].input) if name and i in positions}


def _set_static_shape(info: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    tt = info.type.tensor_type
    tt.ClearField("shape")
    tt.shape.SetInParent()
    for d in shape:
        tt.shape.dim.add().dim_value = int(d)


def static_model(model: onnx.ModelProto, data: DataSet, strict: bool = False,
                 also_freeze: set[str] = frozenset()) -> onnx.ModelProto:
    """A copy of `model` with graph input shapes fixed to `data`'s, and shape-like inputs frozen.

    `also_freeze`: more input names to freeze when small (an expanded case's, see `base_frozen_names`).
    Sets `data.frozen` to the inputs that became initializers (they are no longer fed at run time).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    frozen = [] if strict else frozen_input_names(out, data.inputs)
    if not strict:
        frozen += [n for n in sorted(also_freeze) if n not in frozen and isinstance(data.inputs.get(n), np.ndarray)
                   and data.inputs[n].size <= FREEZE_MAX_ELEMENTS]
    data.frozen = {n: data.inputs[n] for n in frozen}
    keep = []
    for info in out.graph.input:
        if info.name in data.frozen:
            out.graph.initializer.append(numpy_helper.from_array(np.asarray(data.frozen[info.name]), info.name))
            continue
        value = data.inputs.get(info.name)
        if isinstance(value, np.ndarray) and info.type.HasField("tensor_type"):
            _set_static_shape(info, value.shape)
        keep.append(info)
    del out.graph.input[:]
    out.graph.input.extend(keep)
    if out.ir_version < 4:
        out.ir_version = 4
    return out
