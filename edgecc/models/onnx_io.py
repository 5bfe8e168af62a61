"""Helpers shared by the model exporters."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def canonicalize(path: Path, producer: str, fix: Callable | None = None) -> None:
    """Rewrite a freshly exported model with fixed metadata so that every export is byte-identical.

    torch's exporter stamps its own version and doc strings; `fix(model)` may adjust the graph further
    before the model is saved again.
    """
    import onnx

    model = onnx.load(str(path))
    model.producer_name = producer
    model.producer_version = "1"
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]
    if fix is not None:
        fix(model)
    onnx.save_model(model, str(path))
