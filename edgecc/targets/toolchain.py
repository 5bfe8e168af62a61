"""Is a target's toolchain here? Which cross compiler, emulator and runtime does it need?

`edgecc targets` prints this table; `edgecc build` calls `require_build_tools` before compiling so that a
missing cross compiler is reported up front with the `apt-get` line that fixes it.
"""

from __future__ import annotations

import shutil

from edgecc.errors import EdgeccError
from edgecc.targets.registry import TargetSpec, ToolchainStatus


def _cuda_gpu_present() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def _install_hint(spec: TargetSpec, missing: list[str]) -> str | None:
    if not missing:
        return None
    if spec.debian_packages:
        return "apt-get install -y " + " ".join(spec.debian_packages)
    return "install: " + ", ".join(missing)


def toolchain_status(spec: TargetSpec) -> ToolchainStatus:
    missing: list[str] = []
    if spec.device == "cuda":
        gpu = _cuda_gpu_present()
        return ToolchainStatus(
            can_build=True,
            can_run=gpu,
            missing=(),
            install_hint=None,
            how_it_runs="on the CUDA GPU" if gpu else "build only (no GPU on this machine)",
        )
    if spec.cross_compiler and shutil.which(spec.cross_compiler) is None:
        missing.append(spec.cross_compiler)
    can_build = not missing
    if not spec.is_cross:
        lacking = spec.missing_host_features()
        if lacking:
            how = f"build only (this CPU lacks {', '.join(lacking)})"
            return ToolchainStatus(can_build, False, tuple(missing), _install_hint(spec, missing), how)
        return ToolchainStatus(can_build, can_build, tuple(missing), _install_hint(spec, missing), "natively")
    if spec.emulator and shutil.which(spec.emulator[0]) is None:
        missing.append(spec.emulator[0])
    from edgecc.runtime_bridge.emulated import runtime_available

    runtime_ok, runtime_note = runtime_available(spec)
    can_run = can_build and bool(spec.emulator) and shutil.which(spec.emulator[0]) is not None and runtime_ok
    how = f"under {spec.emulator[0]}" if can_run else f"build only ({runtime_note})" if not runtime_ok else "build only"
    return ToolchainStatus(can_build, can_run, tuple(missing), _install_hint(spec, missing), how)


def require_build_tools(spec: TargetSpec) -> None:
    """Fail early, with the install line, when the target's cross compiler is absent."""
    if spec.cross_compiler and shutil.which(spec.cross_compiler) is None:
        raise EdgeccError(
            f"target '{spec.name}' needs the cross compiler {spec.cross_compiler}, which is not installed",
            _install_hint(spec, [spec.cross_compiler]),
        )
