"""`edgecc validate`: the ONNX node conformance harness, and a fixed subset of the host suite.

The subset (`SUBSET`, about 150 cases): for every op of the node suite, its first non-`_expanded` case by
name, taken in op order and capped at 150, plus the first `_expanded` case of the 20 most common ops. It
is deterministic for a given onnx wheel and spreads over every op family; it runs in about 2 minutes on 2
workers. It must match `edgecc/conformance/expected_failures/host.txt` exactly: no unexpected failure, no
unexpected pass. The whole suite is `edgecc validate -t host -j 2` (about 6 minutes here).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from edgecc.conformance.cases import Case, discover, frozen_input_names, static_model, DataSet
from edgecc.conformance.expected import FAIL, PASS, XFAIL, XPASS, classify, read_expected, write_expected
from edgecc.conformance.report import build_report, unexpected, write_markdown

SUBSET_SIZE = 150


def subset(cases: list[Case]) -> list[Case]:
    by_op: dict[str, list[Case]] = {}
    for c in cases:
        by_op.setdefault(c.op, []).append(c)
    plain = [next(c for c in cs if not c.expanded) for _, cs in sorted(by_op.items())
             if any(not c.expanded for c in cs)][:SUBSET_SIZE - 20]
    common = [op for op, _ in Counter(c.op for c in cases).most_common()]
    expanded = [next(c for c in by_op[op] if c.expanded) for op in common if any(c.expanded for c in by_op[op])]
    return plain + expanded[:20]


# ------------------------------------------------------------------------------------ unit tests


def _write_case(root: Path, name: str, wrong: bool = False) -> Case:
    """A Relu case; with wrong=True its expected output is off by 0.5 (a numerics failure)."""
    d = root / name
    (d / "test_data_set_0").mkdir(parents=True)
    node = h.make_node("Relu", ["x"], ["y"])
    graph = h.make_graph([node], name, [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 14)])
    onnx.save(model, str(d / "model.onnx"))
    x = np.array([[-1, 0, 1], [2, -3, 4]], np.float32)
    y = np.maximum(x, 0) + (0.5 if wrong else 0.0)
    (d / "test_data_set_0" / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
    (d / "test_data_set_0" / "output_0.pb").write_bytes(numpy_helper.from_array(y, "y").SerializeToString())
    return Case(name, d, "Relu", False)


def _result(name, outcome, stage=None):
    return {"name": name, "op": "Relu", "outcome": outcome, "stage": stage, "reason": "r" if stage else None,
            "frozen": [], "outputs": [], "seconds": 0.1}


def test_classify_statuses():
    from edgecc.conformance.expected import Expected

    listed = {"a": Expected("a", "import", "x"), "b": Expected("b", "run", "y")}
    assert classify(_result("a", "fail", "import"), listed) == XFAIL
    assert classify(_result("b", "pass"), listed) == XPASS
    assert classify(_result("c", "fail", "numerics"), listed) == FAIL
    assert classify(_result("d", "pass"), listed) == PASS


def test_expected_list_roundtrip_keeps_unselected(tmp_path):
    path = tmp_path / "t.txt"
    write_expected(path, "t", [_result("test_a", "fail", "import"), _result("test_b", "pass")])
    assert set(read_expected(path)) == {"test_a"}
    assert read_expected(path)["test_a"].stage == "import"
    # a -k run over test_c only keeps test_a's entry
    write_expected(path, "t", [_result("test_c", "fail", "build")], selected={"test_c"})
    assert set(read_expected(path)) == {"test_a", "test_c"}
    # a -k run over test_a where it now passes drops it
    write_expected(path, "t", [_result("test_a", "pass")], selected={"test_a"})
    assert set(read_expected(path)) == {"test_c"}


def test_report_counts_and_markdown():
    from edgecc.conformance.expected import Expected

    results = [_result("p", "pass"), _result("x", "fail", "import"), _result("f", "fail", "numerics"),
               _result("u", "pass")]
    expected = {"x": Expected("x", "import", "no converter"), "u": Expected("u", "run", "crash")}
    rep = build_report(results, expected, "host", {}, 1.0)
    assert rep["totals"]["cases"] == 4 and rep["totals"][PASS] == 1 and rep["totals"][XFAIL] == 1
    assert rep["totals"][FAIL] == 1 and rep["totals"][XPASS] == 1 and rep["totals"]["passed"] == 2
    assert rep["by_stage"] == {"import": 1, "build": 0, "run": 0, "numerics": 1}
    assert {c["name"] for c in unexpected(rep)} == {"f", "u"}
    md = write_markdown(rep)
    assert "Unexpected results" in md and "| f | Relu | fail | numerics |" in md


def test_wrong_expected_output_is_a_numerics_failure(tmp_path):
    from edgecc.conformance.worker import run_case

    good = _write_case(tmp_path, "test_good")
    bad = _write_case(tmp_path, "test_bad", wrong=True)
    r = run_case({"name": good.name, "dir": str(good.dir), "op": good.op}, "host")
    assert r["outcome"] == "pass", r
    r = run_case({"name": bad.name, "dir": str(bad.dir), "op": bad.op}, "host")
    assert r["outcome"] == "fail" and r["stage"] == "numerics", r
    assert r["outputs"][0]["max_abs_err"] == pytest.approx(0.5)
    assert "max abs err 0.5" in r["reason"]


def test_subbyte_case_is_fed_and_compared_as_byte_containers(tmp_path):
    """int4 data of a case (ml_dtypes arrays) go in and come back one element per byte; a wrong value fails."""
    import ml_dtypes

    from edgecc.conformance.worker import run_case

    results = {}
    for name, wrong in (("test_int4_good", False), ("test_int4_bad", True)):
        d = tmp_path / name
        (d / "test_data_set_0").mkdir(parents=True)
        graph = h.make_graph([h.make_node("Cast", ["x"], ["y"], to=T.INT4)], name,
                             [h.make_tensor_value_info("x", T.INT4, [6])], [h.make_tensor_value_info("y", T.INT4, [6])])
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), str(d / "model.onnx"))
        x = np.array([-8, -3, 0, 1, 5, 7]).astype(ml_dtypes.int4)
        y = (x.astype(np.int8) + (1 if wrong else 0)).astype(ml_dtypes.int4)  # 7 + 1 wraps to -8
        (d / "test_data_set_0" / "input_0.pb").write_bytes(numpy_helper.from_array(x, "x").SerializeToString())
        (d / "test_data_set_0" / "output_0.pb").write_bytes(numpy_helper.from_array(y, "y").SerializeToString())
        results[name] = run_case({"name": name, "dir": str(d), "op": "Cast"}, "host")
    assert results["test_int4_good"]["outcome"] == "pass", results["test_int4_good"]
    bad = results["test_int4_bad"]
    assert bad["outcome"] == "fail" and bad["stage"] == "numerics", bad
    assert bad["outputs"][0]["dtype"] == "int8"


def test_pool_reports_timeouts_and_keeps_going(tmp_path):
    from edgecc.conformance.runner import run_cases

    cases = [_write_case(tmp_path, f"test_c{i}", wrong=(i == 1)) for i in range(3)]
    results = run_cases(cases, "host", jobs=1, timeout_s=120)
    assert [r["outcome"] for r in results] == ["pass", "fail", "pass"]
    assert results[1]["stage"] == "numerics"
    timed = run_cases(cases[:1], "host", jobs=1, timeout_s=0.01)
    assert timed[0]["outcome"] == "fail" and "timeout" in timed[0]["reason"]


def test_freezes_only_shape_like_inputs():
    node = h.make_node("Reshape", ["x", "shape"], ["y"])
    gather = h.make_node("Gather", ["y", "idx"], ["z"])
    graph = h.make_graph([node, gather], "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3]),
                                               h.make_tensor_value_info("shape", T.INT64, [2]),
                                               h.make_tensor_value_info("idx", T.INT64, [1])],
                         [h.make_tensor_value_info("z", T.FLOAT, None)])
    model = h.make_model(graph)
    data = DataSet({"x": np.zeros((2, 3), np.float32), "shape": np.array([3, 2]), "idx": np.array([1])}, {})
    assert frozen_input_names(model, data.inputs) == ["shape"]
    static = static_model(model, data)
    assert [i.name for i in static.graph.input] == ["x", "idx"]
    assert [t.name for t in static.graph.initializer] == ["shape"]
    assert static_model(model, data, strict=True).graph.initializer == []


def test_expanded_case_freezes_its_base_case_shape_inputs(tmp_path):
    """An `_expanded` case freezes the inputs its base op takes at shape positions, whatever consumes them."""
    from edgecc.conformance.cases import base_frozen_names

    def save(name, nodes):
        (tmp_path / name).mkdir()
        graph = h.make_graph(nodes, name, [h.make_tensor_value_info("x", T.FLOAT, [2, 3]),
                                           h.make_tensor_value_info("shape", T.INT64, [2])],
                             [h.make_tensor_value_info("y", T.FLOAT, None)])
        onnx.save(h.make_model(graph), str(tmp_path / name / "model.onnx"))

    save("test_r", [h.make_node("Reshape", ["x", "shape"], ["y"])])
    save("test_r_expanded", [h.make_node("Identity", ["shape"], ["s2"]), h.make_node("Reshape", ["x", "s2"], ["y"])])
    assert base_frozen_names(tmp_path / "test_r_expanded") == {"shape"}
    assert base_frozen_names(tmp_path / "test_r") == set()
    model = onnx.load(str(tmp_path / "test_r_expanded" / "model.onnx"))
    data = DataSet({"x": np.zeros((2, 3), np.float32), "shape": np.array([3, 2])}, {})
    assert frozen_input_names(model, data.inputs) == []  # Identity is not a shape position
    static = static_model(model, data, also_freeze={"shape"})
    assert [t.name for t in static.graph.initializer] == ["shape"] and list(data.frozen) == ["shape"]


def test_no_cases_selected_exits_nonzero(cli, tmp_path):
    _write_case(tmp_path / "cases", "test_one")
    result = cli("validate", "-k", "does_not_exist_anywhere", "--cases", tmp_path / "cases", "-o", tmp_path / "r")
    assert result.exit_code == 1


def test_cli_unexpected_failure_exits_nonzero(cli, tmp_path):
    _write_case(tmp_path / "cases", "test_bad", wrong=True)
    args = ["validate", "--cases", tmp_path / "cases", "-o", tmp_path / "r", "--expected", tmp_path / "x.txt"]
    assert cli(*args).exit_code == 1
    assert cli(*args, "--update-expected").exit_code == 0
    assert "test_bad" in read_expected(tmp_path / "x.txt")
    assert cli(*args).exit_code == 0  # now an expected failure
    assert (tmp_path / "r" / "report.json").is_file() and (tmp_path / "r" / "report.md").is_file()


# ------------------------------------------------------------------------- the host subset


@pytest.mark.slow
def test_host_subset_matches_expected_list(tmp_path):
    from edgecc.conformance import cases_dir
    from edgecc.conformance.expected import list_path
    from edgecc.conformance.runner import run_cases

    chosen = subset(discover(cases_dir()))
    assert 100 <= len(chosen) <= SUBSET_SIZE
    results = run_cases(chosen, "host", jobs=2, timeout_s=180)
    rep = build_report(results, read_expected(list_path("host")), "host", {"subset": len(chosen)}, 0.0)
    bad = [(c["name"], c["status"], c["stage"], c["reason"]) for c in unexpected(rep)]
    assert not bad, bad
