"""Run a cross-compiled artifact (aarch64, riscv64) on this machine under qemu-user.

The artifact's `model.so` is loaded by `edgecc_runner` (native/runner.cc), a small C++ program built for
the target architecture against that architecture's TVM runtime (installed into the cache by
`python -m edgecc.runtime_bridge.cross_runtime ARCH`). Inputs and outputs travel as .npy files through a
temporary directory; weights are read from the artifact's params.bin by the runner itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.runtime_bridge import cross_runtime
from edgecc.runtime_bridge.params_file import write_params
from edgecc.targets.registry import TargetSpec

RUNNER_SOURCE = Path(__file__).parent / "native" / "runner.cc"
LIBRARY = "model.so"
PARAMS = "params.bin"
#: dtypes the runner reads from .npy
SUPPORTED_INPUT_DTYPES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                          "uint8", "uint16", "uint32", "uint64", "bool"}


def runtime_available(spec: TargetSpec) -> tuple[bool, str]:
    """Whether the TVM runtime for spec.arch is in the cache; the note says how to get it when not."""
    if spec.arch not in cross_runtime.SUPPORTED_ARCHS:
        return False, f"no TVM runtime recipe for {spec.arch}"
    root = cross_runtime.runtime_dir(spec.arch)
    if root is None:
        return False, f"no {spec.arch} TVM runtime: run `{cross_runtime.install_command(spec.arch)}`"
    return True, f"{spec.arch} TVM runtime in {root}"


def _require_runtime(spec: TargetSpec) -> Path:
    root = cross_runtime.runtime_dir(spec.arch)
    if root is None:
        if spec.arch not in cross_runtime.SUPPORTED_ARCHS:
            raise EdgeccError(f"target '{spec.name}' ({spec.arch}) cannot run on this machine: "
                              f"edgecc has no TVM runtime for {spec.arch}", "run it on the real board")
        raise EdgeccError(f"the {spec.arch} TVM runtime that runs '{spec.name}' under qemu is not installed",
                          f"run `{cross_runtime.install_command(spec.arch)}`")
    return root


def _require_tool(tool: str | None, spec: TargetSpec) -> str:
    if not tool:
        raise EdgeccError(f"target '{spec.name}' has no cross compiler or emulator configured",
                          "run it on the real board")
    path = shutil.which(tool)
    if path is None:
        fix = "apt-get install -y " + " ".join(spec.debian_packages) if spec.debian_packages else f"install {tool}"
        raise EdgeccError(f"'{tool}' is not installed (needed to run '{spec.name}' here)", fix)
    return path


def _runner_key(spec: TargetSpec, root: Path) -> str:
    h = hashlib.sha256()
    h.update(RUNNER_SOURCE.read_bytes())
    h.update(spec.arch.encode())
    h.update((spec.cross_compiler or "").encode())
    h.update(json.dumps(cross_runtime.read_manifest(spec.arch) or {}, sort_keys=True).encode())
    h.update(str(root).encode())  # the rpath is baked into the binary
    return h.hexdigest()[:16]


def ensure_runner(spec: TargetSpec) -> Path:
    """The edgecc_runner binary for spec.arch, compiled once per (runner.cc, runtime, arch) and cached."""
    root = _require_runtime(spec)
    compiler = _require_tool(spec.cross_compiler, spec)
    out = cross_runtime.cache_root() / "runners" / spec.arch / f"edgecc_runner-{_runner_key(spec, root)}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lib = (root / "lib").resolve()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = ["nice", "-n", "10", compiler, "-std=c++17", "-O2", "-pthread", str(RUNNER_SOURCE),
           f"-I{(root / 'include').resolve()}", f"-L{lib}",
           # libtvm_runtime is only referenced through the registry it fills at load time: keep it linked
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
           # qemu-user resolves the absolute rpath on the host file system (-L only adds a prefix to try first)
           f"-Wl,-rpath,{lib}", "-o", str(tmp)]
    if shutil.which("nice") is None:
        cmd = cmd[3:]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()[-1:] or ["?"]
        raise EdgeccError(f"compiling edgecc_runner with {spec.cross_compiler} failed: {errors[0].strip()}",
                          f"check the runtime in {root} (rerun `{cross_runtime.install_command(spec.arch)} --force`)")
    tmp.replace(out)
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("edgecc_runner:"):
            return ln[len("edgecc_runner:"):].strip()
    return lines[-1] if lines else "no message"


def _check_library(path: Path, spec: TargetSpec) -> None:
    if not path.is_file():
        raise EdgeccError(f"{path} does not exist", "build the artifact first (edgecc build)")
    machine = cross_runtime.elf_machine(path)
    expected = cross_runtime.ELF_MACHINES.get(spec.arch)
    if machine != expected:
        found = {v: k for k, v in cross_runtime.ELF_MACHINES.items()}.get(machine, f"ELF machine {machine}")
        raise EdgeccError(f"{path} is built for {found}, not {spec.arch} (target '{spec.name}')",
                          f"rebuild it with --target {spec.name}, or run it with its own target")


def _describe_failure(proc: subprocess.CompletedProcess) -> str:
    message = _last_line(proc.stderr or "")
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"crashed with {name}" + (f" ({message})" if message != "no message" else "")
    return message


def run_emulated(artifact_dir: str | Path, spec: TargetSpec, inputs: list[np.ndarray], function: str = "main",
                 timeout: float = 600) -> list[np.ndarray]:
    """Run `function` of the artifact's model.so for `spec` under its emulator; returns the flattened outputs.

    `inputs` are the user inputs in signature order; the runner appends the tensors of params.bin.
    """
    artifact_dir = Path(artifact_dir)
    library = artifact_dir / LIBRARY
    _check_library(library, spec)
    _require_runtime(spec)
    emulator = list(spec.emulator)
    _require_tool(emulator[0] if emulator else None, spec)
    runner = ensure_runner(spec)

    with tempfile.TemporaryDirectory(prefix="edgecc-emu-") as tmp_name:
        tmp = Path(tmp_name)
        params = artifact_dir / PARAMS
        if not params.is_file():  # weights linked in, or a model without weights
            params = tmp / PARAMS
            write_params(params, [])
        input_paths = []
        for i, value in enumerate(inputs):
            arr = np.asarray(value)
            if str(arr.dtype) not in SUPPORTED_INPUT_DTYPES:
                raise EdgeccError(f"input {i} has dtype {arr.dtype}, which the emulated runner cannot pass",
                                  "give " + ", ".join(sorted(SUPPORTED_INPUT_DTYPES)))
            arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # keeps 0-d inputs 0-d
            path = tmp / f"in{i}.npy"
            np.save(path, arr, allow_pickle=False)
            input_paths.append(str(path))
        out_dir = tmp / "out"
        out_dir.mkdir()
        cmd = [*emulator, str(runner), str(library.resolve()), str(params.resolve()), function, str(out_dir),
               *input_paths]
        # One TVM worker thread unless the caller asks for more: under qemu-user extra threads only spin
        # (they measure nothing), and on a shared 2-core machine they slow every other job down.
        env = {**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp, env=env)
        except subprocess.TimeoutExpired as exc:
            raise EdgeccError(f"running '{function}' of {library} under {emulator[0]} timed out after {timeout:g} s",
                              "give a larger timeout, or smaller inputs (qemu is 10-50x slower than the board)"
                              ) from exc
        if proc.returncode != 0:
            raise EdgeccError(f"running '{function}' of {library} under {emulator[0]} failed: "
                              f"{_describe_failure(proc)}",
                              "check the inputs against the model's signature (count, dtype, shape)")
        outputs = []
        while (out_dir / f"out{len(outputs)}.npy").is_file():
            outputs.append(np.load(out_dir / f"out{len(outputs)}.npy", allow_pickle=False))
        return outputs
