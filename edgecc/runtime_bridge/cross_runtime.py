"""The TVM runtime for a foreign architecture, so cross-compiled artifacts run here under qemu-user.

A cross-compiled `model.so` needs `libtvm_runtime.so` + `libtvm_ffi.so` built for its own architecture. This
module puts them, with the tvm_ffi C++ headers the runner compiles against, into the edgecc cache:

    $EDGECC_CACHE (default ~/.cache/edgecc)/runtimes/<arch>/
        lib/libtvm_runtime.so, lib/libtvm_ffi.so
        include/                 tvm_ffi headers (tvm/ffi/..., dlpack/...)
        runtime.json             versions, where it came from, sizes

* aarch64: the apache-tvm / apache-tvm-ffi wheels for `manylinux_2_28_aarch64` of exactly the installed
  versions are fetched with `pip download` (PyPI) and only the two libraries and the headers are kept.
* riscv64: there is no wheel. The libraries are cross-built with riscv64-linux-gnu-g++ and cmake from
  the apache-tvm-ffi sdist (PyPI) and from the runtime sources the installed apache-tvm wheel ships
  (site-packages/tvm/src/runtime); see `_build_from_source`.

This runs at install time (`python -m edgecc.runtime_bridge.cross_runtime aarch64`, from
scripts/install.sh), never implicitly at run time: `runtime_dir(arch)` only looks in the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgecc.errors import EdgeccError

#: wheel platform tag per architecture, for archs that PyPI has TVM wheels for
WHEEL_PLATFORMS = {"aarch64": "manylinux_2_28_aarch64"}
#: archs whose runtime is cross-built from source (value: the GNU triple of the cross toolchain)
SOURCE_BUILDS = {"riscv64": "riscv64-linux-gnu"}
SUPPORTED_ARCHS = tuple(sorted({*WHEEL_PLATFORMS, *SOURCE_BUILDS}))

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
#: ELF e_machine of each arch, to check what we extracted or built
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "riscv64": 243}
MANIFEST = "runtime.json"

Log = Callable[[str], None]


def cache_root() -> Path:
    """$EDGECC_CACHE, else ~/.cache/edgecc."""
    env = os.environ.get("EDGECC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgecc"


def installed_versions() -> dict[str, str]:
    """The host's TVM versions: a foreign runtime must match them (the VM bytecode format is not stable)."""
    versions = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError as exc:
            raise EdgeccError(f"{dist} is not installed", "pip install -e . (it pins the TVM versions)") from exc
    return versions


def install_command(arch: str) -> str:
    return f"python -m edgecc.runtime_bridge.cross_runtime {arch}"


def _arch_dir(arch: str) -> Path:
    return cache_root() / "runtimes" / arch


def read_manifest(arch: str) -> dict | None:
    path = _arch_dir(arch) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def runtime_dir(arch: str) -> Path | None:
    """The cached runtime for `arch` (with lib/ and include/), or None when absent or for other TVM versions."""
    manifest = read_manifest(arch)
    if manifest is None:
        return None
    try:
        if manifest.get("versions") != installed_versions():
            return None
    except EdgeccError:
        return None
    root = _arch_dir(arch)
    if not all((root / "lib" / lib).is_file() for lib in RUNTIME_LIBS):
        return None
    if not (root / "include" / "tvm" / "ffi" / "function.h").is_file():
        return None
    return root


def elf_machine(path: Path) -> int | None:
    """The e_machine field of an ELF file (None if it is not ELF)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _check_elf(path: Path, arch: str) -> None:
    machine = elf_machine(path)
    if machine != ELF_MACHINES[arch]:
        raise EdgeccError(f"{path.name} is not an {arch} library (ELF machine {machine})",
                          f"delete {path.parent.parent} and rerun `{install_command(arch)}`")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------------
# aarch64: from the PyPI wheels
# ---------------------------------------------------------------------------------------------------


def _pip_download(platform_tag: str, versions: dict[str, str], dest: Path, log: Log) -> list[Path]:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", platform_tag,
           "--python-version", py, "-d", str(dest), *(f"{d}=={v}" for d, v in versions.items())]
    log("  $ " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        raise EdgeccError(f"pip could not download the {platform_tag} TVM wheels: {tail[0]}",
                          "check that PyPI is reachable and has these versions for that platform")
    return sorted(dest.glob("*.whl"))


def _extract_wheels(wheels: list[Path], out: Path) -> None:
    """Keep only the runtime libraries and the tvm_ffi headers from the downloaded wheels."""
    (out / "lib").mkdir(parents=True)
    (out / "include").mkdir()
    wanted = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if name in wanted:
                    target = out / "lib" / wanted[name]
                elif name.startswith("tvm_ffi/include/") and not info.is_dir():
                    target = out / "include" / name[len("tvm_ffi/include/"):]
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    missing = [lib for lib in RUNTIME_LIBS if not (out / "lib" / lib).is_file()]
    if missing:
        raise EdgeccError(f"the downloaded wheels lack {', '.join(missing)}",
                          "report this: the TVM wheel layout changed")


def _install_from_wheels(arch: str, versions: dict[str, str], out: Path, log: Log) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgecc-wheels-") as tmp:
        log(f"downloading apache-tvm {versions['apache-tvm']} + apache-tvm-ffi {versions['apache-tvm-ffi']} "
            f"wheels for {WHEEL_PLATFORMS[arch]} (about 100 MB)...")
        wheels = _pip_download(WHEEL_PLATFORMS[arch], versions, Path(tmp), log)
        log("extracting " + ", ".join(RUNTIME_LIBS) + " and the tvm_ffi headers...")
        _extract_wheels(wheels, out)
        return {"source": "pypi-wheels", "wheels": [w.name for w in wheels]}


# ---------------------------------------------------------------------------------------------------
# riscv64: cross-built from source
# ---------------------------------------------------------------------------------------------------


NATIVE_DIR = Path(__file__).parent / "native"
#: edgecc's own implementations of the TVM support headers that the apache-tvm wheel does not ship
#: (native/shim_*.h) -> where the runtime sources include them from
SUPPORT_SHIMS = {
    "shim_tvm_support_io.h": "include/tvm/support/io.h",
    "shim_tvm_support_serializer.h": "include/tvm/support/serializer.h",
    "shim_tvm_support_cuda_nvtx.h": "include/tvm/support/cuda/nvtx.h",
    "shim_src_support_bytes_io.h": "src/support/bytes_io.h",
    "shim_src_support_base64.h": "src/support/base64.h",
    "shim_src_support_utils.h": "src/support/utils.h",
}
#: the minimal CPU runtime: everything the Relax VM needs to load a library and run it (no RPC, disco,
#: CUDA, OpenCL, Hexagon, contrib libraries). builtin_fp16.cc is left out: TVM links the fp16
#: conversions into every model.so, and its compiler-rt header is not in the wheel.
RUNTIME_CMAKELISTS = """\
cmake_minimum_required(VERSION 3.18)
project(edgecc_tvm_runtime CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
file(GLOB RUNTIME_SOURCES src/runtime/*.cc src/runtime/memory/*.cc src/runtime/vm/*.cc)
list(FILTER RUNTIME_SOURCES EXCLUDE REGEX "builtin_fp16\\.cc$")
add_library(tvm_runtime SHARED ${RUNTIME_SOURCES})
target_include_directories(tvm_runtime PRIVATE include src ${TVM_FFI_INCLUDE})
target_compile_definitions(tvm_runtime PRIVATE TVM_LOG_CUSTOMIZE=0)
# libatomic: riscv64 has no native 1-byte atomics
target_link_libraries(tvm_runtime PRIVATE ${TVM_FFI_LIBRARY} dl pthread atomic)
target_link_options(tvm_runtime PRIVATE -Wl,--no-undefined)
# find libtvm_ffi.so beside it, and bake in no build-tree paths
set_target_properties(tvm_runtime PROPERTIES BUILD_WITH_INSTALL_RPATH ON INSTALL_RPATH "\\$ORIGIN")
"""


def _run(cmd: list[str], what: str, log_file: Path) -> None:
    """Run a build step niced; on failure raise with the first compiler error (full log kept in log_file)."""
    if shutil.which("nice"):
        cmd = ["nice", "-n", "10", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log_file.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:] or ["no output"]
        raise EdgeccError(f"{what} failed: {errors[0].strip()}", f"see the full log in {log_file}")


def _cmake_version() -> tuple[int, ...]:
    out = subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout
    try:
        return tuple(int(x) for x in out.split()[2].split(".")[:2])
    except (IndexError, ValueError):
        return (0,)


def _fetch_ffi_sdist(version: str, dest: Path, log: Log) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "apache-tvm-ffi",
           "-d", str(dest), f"apache-tvm-ffi=={version}"]
    log("  $ " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = sorted(dest.glob("apache_tvm_ffi-*.tar.gz")) + sorted(dest.glob("apache-tvm-ffi-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no sdist"]
        raise EdgeccError(f"pip could not download the apache-tvm-ffi {version} sdist: {tail[0]}",
                          "check that PyPI is reachable")
    with tarfile.open(sdists[0]) as tf:
        tf.extractall(dest / "src", filter="data")
    roots = [p for p in (dest / "src").iterdir() if (p / "CMakeLists.txt").is_file()]
    if not roots:
        raise EdgeccError("the apache-tvm-ffi sdist has no CMakeLists.txt", "report this: the sdist layout changed")
    return roots[0]


def _tvm_package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeccError("apache-tvm is not installed", "pip install -e .")
    return Path(list(spec.submodule_search_locations)[0])


def _stage_runtime_sources(dest: Path) -> None:
    """Copy the CPU runtime sources the apache-tvm wheel ships (tvm/src/runtime, tvm/include) and add
    edgecc's stand-ins for the support headers it lacks."""
    tvm_dir = _tvm_package_dir()
    src = tvm_dir / "src" / "runtime"
    if not (src / "vm" / "vm.cc").is_file() or not (tvm_dir / "include" / "tvm" / "runtime").is_dir():
        raise EdgeccError(f"the installed apache-tvm ({tvm_dir}) ships no runtime sources",
                          "this TVM version cannot be rebuilt for riscv64; keep riscv64 build-only")
    shutil.copytree(tvm_dir / "include", dest / "include")
    (dest / "src" / "runtime").mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".cc", ".h"):
            shutil.copy2(f, dest / "src" / "runtime" / f.name)
    for sub in ("memory", "vm"):
        shutil.copytree(src / sub, dest / "src" / "runtime" / sub,
                        ignore=shutil.ignore_patterns("cuda", "hexagon", "__pycache__"))
    for shim, target in SUPPORT_SHIMS.items():
        path = dest / target
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(NATIVE_DIR / shim, path)
    (dest / "CMakeLists.txt").write_text(RUNTIME_CMAKELISTS)


def _build_from_source(arch: str, triple: str, versions: dict[str, str], out: Path, log: Log) -> dict:
    """Cross-build libtvm_ffi (from its PyPI sdist) and a minimal libtvm_runtime (from the runtime sources
    in the installed apache-tvm wheel) with `triple`-g++ and cmake."""
    tools = {"cmake": "cmake", "C compiler": f"{triple}-gcc", "C++ compiler": f"{triple}-g++"}
    missing = [f"{tool} ({what})" for what, tool in tools.items() if shutil.which(tool) is None]
    if missing:
        raise EdgeccError(f"cannot build the {arch} runtime: {', '.join(missing)} not installed",
                          f"apt-get install -y cmake g++-{triple} ninja-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    cross = ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={arch}",
             f"-DCMAKE_C_COMPILER={triple}-gcc", f"-DCMAKE_CXX_COMPILER={triple}-g++", "-DCMAKE_BUILD_TYPE=Release"]
    work = Path(tempfile.mkdtemp(prefix=f"edgecc-{arch}-build-"))
    logs = cache_root() / "runtimes" / f"{arch}-build-logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        log(f"downloading the apache-tvm-ffi {versions['apache-tvm-ffi']} sdist...")
        ffi_src = _fetch_ffi_sdist(versions["apache-tvm-ffi"], work / "ffi-sdist", log)
        cmakelists = ffi_src / "CMakeLists.txt"
        text = cmakelists.read_text()
        have = _cmake_version()
        match = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)", text)
        if match and have >= (3, 18) and have < (int(match.group(1)), int(match.group(2))):
            # it builds with older cmake (Debian 12 has 3.25); the newer requirement serves other targets
            log(f"  (apache-tvm-ffi asks for cmake {match.group(1)}.{match.group(2)}; building with "
                f"{'.'.join(map(str, have))})")
            cmakelists.write_text(text.replace(match.group(0), f"cmake_minimum_required(VERSION {have[0]}.{have[1]}"))

        t0 = time.monotonic()
        log(f"building libtvm_ffi.so for {arch} with {triple}-g++ (a few minutes)...")
        ffi_build = work / "ffi-build"
        _run(["cmake", "-S", str(ffi_src), "-B", str(ffi_build), *generator, *cross,
              "-DTVM_FFI_USE_LIBBACKTRACE=OFF", "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=OFF"],
             "configuring apache-tvm-ffi", log_file=logs / "ffi-configure.log")
        _run(["cmake", "--build", str(ffi_build), "--target", "tvm_ffi_shared", "-j", jobs],
             "building libtvm_ffi", log_file=logs / "ffi-build.log")
        ffi_lib = next(ffi_build.rglob("libtvm_ffi.so"))
        log(f"  libtvm_ffi.so built in {time.monotonic() - t0:.0f} s")

        t1 = time.monotonic()
        log(f"building a minimal libtvm_runtime.so (Relax VM, CPU only) for {arch} from the runtime sources "
            f"of the installed apache-tvm {versions['apache-tvm']}...")
        rt_src = work / "runtime-src"
        _stage_runtime_sources(rt_src)
        ffi_include = [ffi_src / "include", ffi_src / "3rdparty" / "dlpack" / "include"]
        rt_build = work / "runtime-build"
        _run(["cmake", "-S", str(rt_src), "-B", str(rt_build), *generator, *cross,
              "-DTVM_FFI_INCLUDE=" + ";".join(map(str, ffi_include)), f"-DTVM_FFI_LIBRARY={ffi_lib}"],
             "configuring the TVM runtime", log_file=logs / "runtime-configure.log")
        _run(["cmake", "--build", str(rt_build), "-j", jobs],
             "building libtvm_runtime", log_file=logs / "runtime-build.log")
        log(f"  libtvm_runtime.so built in {time.monotonic() - t1:.0f} s")

        (out / "lib").mkdir(parents=True)
        shutil.copy2(ffi_lib, out / "lib" / "libtvm_ffi.so")
        shutil.copy2(rt_build / "libtvm_runtime.so", out / "lib" / "libtvm_runtime.so")
        shutil.copytree(ffi_include[0], out / "include")
        shutil.copytree(ffi_include[1], out / "include", dirs_exist_ok=True)
        return {"source": "cross-built: apache-tvm-ffi sdist + runtime sources of the apache-tvm wheel",
                "compiler": f"{triple}-g++", "build_seconds": round(time.monotonic() - t0, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def install(arch: str, *, force: bool = False, log: Log = print) -> Path:
    """Fetch or build the runtime for `arch` into the cache; returns its directory. Atomic: a failed
    install leaves the previous state."""
    if arch not in SUPPORTED_ARCHS:
        raise EdgeccError(f"no foreign TVM runtime recipe for '{arch}'", "use one of: " + ", ".join(SUPPORTED_ARCHS))
    existing = runtime_dir(arch)
    if existing is not None and not force:
        log(f"{arch}: runtime already in {existing} (use --force to redo)")
        return existing
    versions = installed_versions()
    final = _arch_dir(arch)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=final.parent))
    try:
        if arch in WHEEL_PLATFORMS:
            info = _install_from_wheels(arch, versions, tmp, log)
        else:
            info = _build_from_source(arch, SOURCE_BUILDS[arch], versions, tmp, log)
        for lib in RUNTIME_LIBS:
            _check_elf(tmp / "lib" / lib, arch)
        sizes = {lib: (tmp / "lib" / lib).stat().st_size for lib in RUNTIME_LIBS}
        sizes["include"] = _dir_size(tmp / "include")
        manifest = {"arch": arch, "versions": versions, "sizes": sizes,
                    "seconds": round(time.monotonic() - start, 1), **info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{arch}: runtime installed in {final} in {time.monotonic() - start:.0f} s ("
        + ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items()) + ")")
    return final


def _smoke_test(arch: str, log: Log) -> None:
    """Build the runner against the new runtime and start it under qemu once without arguments (it prints
    its usage and exits 2): proves the emulated dynamic linker finds and loads the foreign libraries."""
    from edgecc.runtime_bridge.emulated import ensure_runner
    from edgecc.targets.registry import all_targets

    specs = [s for s in all_targets() if s.arch == arch and s.emulator and s.cross_compiler]
    if not specs:
        return
    spec = specs[0]
    if shutil.which(spec.cross_compiler) is None or shutil.which(spec.emulator[0]) is None:
        log(f"skipping the runner check: {spec.cross_compiler} or {spec.emulator[0]} is not installed")
        return
    log(f"building edgecc_runner for {arch} and starting it under {spec.emulator[0]}...")
    start = time.monotonic()
    runner = ensure_runner(spec)
    proc = subprocess.run([*spec.emulator, str(runner)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 2 or "usage" not in proc.stderr:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit status {proc.returncode}"]
        raise EdgeccError(f"edgecc_runner does not start under {spec.emulator[0]}: {last[0].strip()}",
                          f"rerun `{install_command(arch)} --force`")
    log(f"{arch}: edgecc_runner loads libtvm_runtime under {spec.emulator[0]} ({time.monotonic() - start:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    no_check = "--no-check" in args
    archs = [a for a in args if not a.startswith("-")]
    wants_help = "-h" in args or "--help" in args
    if not archs or wants_help:
        print(f"usage: python -m edgecc.runtime_bridge.cross_runtime [--force] [--no-check] ARCH [ARCH ...]\n"
              f"  ARCH: {', '.join(SUPPORTED_ARCHS)}\n"
              f"  cache: {cache_root() / 'runtimes'} (set EDGECC_CACHE to move it)")
        return 0 if wants_help else 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    status = 0
    for arch in archs:
        try:
            install(arch, force=force, log=log)
            if not no_check:
                _smoke_test(arch, log)
        except EdgeccError as exc:
            print(f"error: {arch}: {exc.one_line()}", file=sys.stderr, flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
