"""The work-stealing helper (`native/edgecc_parallel.c`) compiled for a target, for linking into artifacts.

Every CPU artifact's kernels call it (`edgecc/ir_passes/work_stealing.py`), so `model.so` and the firmware's
static library link this object. It is compiled as C by the target's g++ (the cross compiler for arm / riscv
targets), from a fixed relative file name so the object holds no temp path (artifacts are byte-identical from
build to build), and cached by source, compiler and flags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgecc.errors import EdgeccError
from edgecc.targets.registry import TargetSpec

SOURCE = Path(__file__).parent / "native" / "edgecc_parallel.c"
CFLAGS = ("-x", "c", "-std=c11", "-O2", "-fPIC")
# aarch64 gcc >= 10 calls libgcc's out-of-line atomics (__aarch64_cas8_acq_rel) by default: inline them so
# the object needs nothing from the final link
ARCH_CFLAGS = {"aarch64": ("-mno-outline-atomics",)}


def parallel_object(spec: TargetSpec) -> Path:
    """The helper's object file for `spec`'s architecture (compiled once, then cached)."""
    from edgecc.runtime_bridge.cross_runtime import cache_root
    from edgecc.runtime_bridge.firmware import _tool

    cc = _tool(spec, "g++", "compile the kernels' thread helper")  # with -x c: the helper is plain C
    flags = (*CFLAGS, *ARCH_CFLAGS.get(spec.arch, ()))
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join((cc, *flags)).encode())
    key.update(subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.encode())
    out = cache_root() / "parallel" / spec.arch / f"edgecc_parallel-{key.hexdigest()[:16]}.o"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecc-parallel-") as work:
        shutil.copy(SOURCE, Path(work) / SOURCE.name)
        proc = subprocess.run([cc, *flags, "-c", SOURCE.name, "-o", "edgecc_parallel.o"], cwd=work,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise EdgeccError(f"compiling the thread helper with {cc} failed: "
                              + " | ".join(proc.stderr.strip().splitlines()[-3:]),
                              f"check that {cc} can compile C for {spec.arch}")
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copy(Path(work) / "edgecc_parallel.o", tmp)
        tmp.replace(out)
    return out
