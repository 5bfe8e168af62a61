"""edgecc plugin template: a reference "NPU" target (`ref-npu`) that offloads matmul and conv to its own C library.

edgecc finds this package through the entry point in pyproject.toml:

    [project.entry-points."edgecc.targets"]
    ref-npu = "edgecc_ref_npu:targets"

`targets()` returns the `TargetSpec`; its `byoc` field names the BYOC description (`BYOC` below) that
edgecc imports when it compiles for the target: the patterns that pick the ops the NPU takes, and the
external codegen (`relax.ext.ref_npu`, in `codegen.py`) that turns them into calls into `csrc/ref_npu.c`.
The reference NPU runs on this machine's CPU, so everything else is compiled for the host as usual.
"""

from __future__ import annotations

from pathlib import Path

from edgecc.targets import TargetSpec
from edgecc.targets.byoc import ByocSpec

from edgecc_ref_npu import codegen

__all__ = ["BYOC", "targets", "call_counts"]

EXPECTED_FAILURES = Path(__file__).parent / "expected_failures.txt"

BYOC = ByocSpec(
    codegen=codegen.CODEGEN,
    patterns=codegen.patterns,
    offloads=codegen.OFFLOADS,
    register=codegen.register,
)


def targets() -> list[TargetSpec]:
    """The targets this package adds to edgecc (the `edgecc.targets` entry point)."""
    from edgecc.targets.registry import host_target

    host = host_target()  # the reference NPU sits beside this machine's CPU (get_target would recurse here)
    return [
        TargetSpec(
            name="ref-npu",
            description="reference NPU (edgecc plugin template): matmul/conv in its C library, rest on the host CPU",
            arch=host.arch,
            tvm_target=dict(host.tvm_target),
            features=host.features,
            vector_bits=host.vector_bits,
            num_cores=host.num_cores,
            vector_mnemonics=host.vector_mnemonics,
            byoc="edgecc_ref_npu:BYOC",
            # `edgecc validate --target ref-npu` reads this list of expected failures (shipped with the plugin)
            extra={"expected_failures": str(EXPECTED_FAILURES)},
        )
    ]


def _module(lib):
    import tvm

    if isinstance(lib, (str, Path)):
        lib = tvm.runtime.load_module(str(lib))  # same path = same loaded library = same counters
    elif isinstance(lib, tvm.runtime.Executable):
        lib = lib.jit()
    return lib.get_function(codegen.COUNT_FUNCTION, query_imports=True)


def call_counts(lib) -> dict[str, int]:
    """Kernel calls made by the NPU library inside a loaded model: `lib` is the artifact's model.so path,
    a loaded runtime module or an executable from `relax.build`."""
    count = _module(lib)
    return {kind: int(count(index)) for kind, index in codegen.KINDS.items()}
