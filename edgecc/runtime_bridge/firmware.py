"""Firmware deliverables of an artifact: the C API, and for `--emit static` a static model library.

`edgecc build --emit shared` (default) adds to the artifact

    include/edgecc_model.h        the C API (capi/edgecc_model.h)
    cmake/edgecc_model-config.cmake, cmake/edgecc_model.mk
                                  find_package(edgecc_model) / `include .../edgecc_model.mk`
    cmake/edgecc_model.cc         the API's source: a shared artifact carries no compiled code besides
                                  model.so, so the firmware build compiles it against the TVM runtime the
                                  firmware brings (EDGECC_TVM_RUNTIME_DIR: lib/ + include/)

`--emit static` adds, for the target's architecture,

    lib/libedgecc_model.a         one relocatable object: the kernels and the VM bytecode built as a TVM
                                  "system library" (`relax.build(..., system_lib=True)`), the compiled C API,
                                  the manifest subset the API reads, and with `--embed-params` params.bin
    lib/libtvm_runtime.so, lib/libtvm_ffi.so
                                  the TVM runtime it links against. Neither the TVM wheel nor edgecc's cross
                                  runtimes have a static libtvm_runtime.a, so the shared runtime is shipped
                                  and the manifest's `link.runtime_kind` says "shared".

The manifest gets `deliverables` (every file added, its bytes and sha256, the memory plan the C API
reports) and `link` (libraries in link order, their sizes, the flags). Everything is byte-reproducible:
no timestamps (ar D mode), no paths, no debug info in the compiled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from edgecc.errors import EdgeccError
from edgecc.targets.registry import TargetSpec

CAPI_DIR = Path(__file__).parent / "capi"
HEADER = "edgecc_model.h"
SOURCE = "edgecc_model.cc"
EMITS = ("shared", "static")
LIBRARY_A = "libedgecc_model.a"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
SYSTEM_LIBS = ("stdc++", "m", "pthread", "dl")
API_CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-ffunction-sections", "-fdata-sections")

Say = Callable[[str], None]


# ------------------------------------------------------------------------------------------- toolchain


def _tool(spec: TargetSpec, name: str, purpose: str = "build the firmware library") -> str:
    """`g++`, `ar`, `ld` for the target (prefix of the cross compiler, or the host's)."""
    if spec.cross_compiler:
        prefix = spec.cross_compiler[: -len("g++")] if spec.cross_compiler.endswith("g++") else ""
        tool = prefix + name
    else:
        tool = name
    if shutil.which(tool) is None:
        raise EdgeccError(f"'{tool}' is not installed (needed to {purpose} for '{spec.name}')",
                          "apt-get install -y " + " ".join(spec.debian_packages) if spec.debian_packages
                          else "install binutils and g++")
    return tool


def runtime_dir(spec: TargetSpec) -> Path:
    """A directory with lib/libtvm_runtime.so, lib/libtvm_ffi.so and include/ (tvm_ffi headers) for spec.arch.

    Host: the installed TVM wheels (symlinked into the edgecc cache once). Cross: the cached cross runtime.
    """
    from edgecc.runtime_bridge import cross_runtime

    if spec.is_cross:
        root = cross_runtime.runtime_dir(spec.arch)
        if root is None:
            raise EdgeccError(f"the {spec.arch} TVM runtime that --emit static links against is not installed",
                              f"run `{cross_runtime.install_command(spec.arch)}`")
        return root
    import tvm
    import tvm_ffi
    from tvm_ffi import libinfo

    root = cross_runtime.cache_root() / "runtimes" / f"{spec.arch}-host"
    wanted = {
        root / "lib" / "libtvm_runtime.so": Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
        root / "lib" / "libtvm_ffi.so": Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so",
        root / "include": Path(libinfo.find_include_path()),
    }
    for link, src in wanted.items():
        if not src.exists():
            raise EdgeccError(f"{src} is missing from the TVM wheels", "pip install -e . (reinstall apache-tvm)")
        if link.is_symlink() and Path(os.readlink(link)) == src:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src)
        tmp.replace(link)
    return root


TVM_HEADERS = ("tvm/runtime/device_api.h", "tvm/runtime/base.h")  # the C API's arena hook (DeviceAPI)
TVM_INCLUDE = "tvm_include"  # cmake/tvm_include/ of a shared artifact holds TVM_HEADERS


def tvm_include_dir() -> Path:
    """The installed TVM wheel's include dir: tvm/runtime/device_api.h for the C API's arena hook.

    The headers are the same for every architecture, and the runtimes edgecc links (x86-64 wheel, aarch64
    wheel, riscv64 built from the x86 wheel's sources) are the same TVM version, so one copy serves all."""
    import tvm

    root = Path(tvm.__file__).parent / "include"
    for rel in TVM_HEADERS:
        if not (root / rel).is_file():
            raise EdgeccError(f"{root / rel} is missing from the TVM wheel", "pip install -e . (reinstall apache-tvm)")
    return root


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    if shutil.which("nice"):
        cmd = ["nice", "-n", "10", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()[-3:]
        raise EdgeccError(f"{what} failed: " + " | ".join(ln.strip() for ln in lines[:3]),
                          "see the command: " + " ".join(cmd)[:300])


def api_object(spec: TargetSpec) -> Path:
    """The C API compiled for spec.arch (cached by source, compiler and runtime headers)."""
    from edgecc.runtime_bridge import cross_runtime

    root = runtime_dir(spec)
    cxx = _tool(spec, "g++")
    key = hashlib.sha256()
    for f in (CAPI_DIR / HEADER, CAPI_DIR / SOURCE):
        key.update(f.read_bytes())
    key.update(cxx.encode() + json.dumps(API_CXXFLAGS).encode())
    key.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    key.update((root / "include" / "tvm" / "ffi" / "function.h").read_bytes())
    tvm_inc = tvm_include_dir()
    for rel in TVM_HEADERS:
        key.update((tvm_inc / rel).read_bytes())
    out = cross_runtime.cache_root() / "capi" / spec.arch / f"edgecc_model-{key.hexdigest()[:16]}.o"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecc-capi-") as work:
        # compile from a fixed relative name so the object holds no temp path
        shutil.copy(CAPI_DIR / SOURCE, Path(work) / SOURCE)
        shutil.copy(CAPI_DIR / HEADER, Path(work) / HEADER)
        _run([cxx, *API_CXXFLAGS, "-c", SOURCE, "-I.", "-isystem", str((root / "include").resolve()),
              "-isystem", str(tvm_inc), "-o", "edgecc_model.o"], f"compiling the C API with {cxx}", cwd=Path(work))
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copy(Path(work) / "edgecc_model.o", tmp)
        tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------- memory


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
                "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "bool": 1}


_WORKSPACE_CALL = re.compile(r"TVMBackendAllocWorkspace\(\d+, \w+, T\.uint64\((\d+)\)")
_WORKSPACE_ANY = re.compile(r"TVMBackendAllocWorkspace\(")


def workspace_bytes(lowered, tvm_target=None) -> int | None:
    """Most scratch one kernel takes from the TVM workspace (TVMBackendAllocWorkspace) at once, 64-byte aligned.

    The kernels run one after another, so the largest per-kernel sum bounds what a run holds. Read off the
    kernels as `relax.build` compiles them: the same TIR pipeline (`tvm.tirx.build`: the target's default
    pipeline, then `LowerTVMBuiltin`), which decides what goes to the workspace (every buffer that is not a
    small constant-size stack array, "local" scope included) and what StorageRewrite merges or drops. None
    (unknown) when a kernel's workspace size depends on runtime shapes or the kernels cannot be lowered here.
    """
    import importlib

    import tvm
    from tvm import tirx

    from edgecc.ir_passes.memory_plan import align_up

    prims = {gv: f for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    if not prims:
        return 0
    target = tvm_target if tvm_target is not None else tvm.target.Target("llvm")
    if target.host is not None:  # the host target as tvm.tirx.build picks it
        host_target = target.host
    elif target.get_target_device_type() == 1:  # kDLCPU
        host_target = target
    else:
        host_target = tvm.target.Target("llvm")
    try:
        mod = tirx.transform.BindTarget(target.with_host(host_target))(tvm.IRModule(prims))
        pipeline, finalize_host, _ = tirx.get_default_tir_pipeline(target)
        host, _devices = importlib.import_module("tvm.tirx.build").split_host_device_mods(pipeline(mod))
        host = finalize_host()(host)
    except Exception:  # noqa: BLE001 - a figure we cannot read is "unknown", never a failed build
        return None
    best = 0
    for _, func in host.functions_items():
        text = func.script()
        sizes = [int(n) for n in _WORKSPACE_CALL.findall(text)]
        if len(sizes) != len(_WORKSPACE_ANY.findall(text)):
            return None  # a size computed at run time
        best = max(best, sum(align_up(n) for n in sizes))
    return best


def run_memory(manifest: dict, lowered, tvm_target=None) -> dict:
    """What a run of the C API holds on the heap, and what a caller-provided arena must have (bytes).

    - weights: params.bin as one buffer (read whole to check its sha256; `weights_bytes` is the tensors alone,
      `params_file_bytes` adds the header and 64-byte alignment padding) or linked in (`--embed-params`);
    - inputs: one buffer per input, allocated once at create (`input_bytes`);
    - arena: the entry function's storage blocks (activations and outputs) each rounded to 64 bytes
      (`arena_aligned_bytes`), plus the largest kernel workspace (`workspace_bytes`), plus the outputs of the
      previous run (`held_output_bytes`: the Relax VM keeps its last return value until the next call returns):
      `arena_run_bytes`, the size edgecc_model_arena_bytes() reports (plus 64 bytes to align the caller's
      buffer). null when a size depends on runtime shapes.
    - `run_bytes`: params.bin + inputs + arena_run_bytes, the heap a run needs without a caller's arena (the
      TVM runtime's own tables and the loaded code come on top: a few hundred KiB, not planned here).
    """
    from edgecc.ir_passes.memory_plan import module_memory

    from edgecc.ir_passes.memory_plan import align_up

    def nbytes(t: dict) -> int | None:
        n = _DTYPE_BYTES.get(t["dtype"], 4)
        for d in t["shape"]:
            if not isinstance(d, int):
                return None
            n *= d
        return n

    entry = manifest.get("entry", "main")
    workspace = workspace_bytes(lowered, tvm_target) if lowered is not None else 0
    fn = module_memory(lowered).get(entry) if lowered is not None else None
    sig = manifest["signature"]["built"]
    inputs = sum(nbytes(t) or 0 for t in sig["inputs"])
    outputs = [nbytes(t) for t in sig["outputs"]]
    held = sum(align_up(n) for n in outputs) if None not in outputs else None
    params_file = manifest["files"]["params.bin"]["bytes"]
    arena_run = None
    if fn is not None and fn.dynamic_blocks == 0 and workspace is not None and held is not None:
        arena_run = fn.aligned_bytes + workspace + held
    return {
        "weights_bytes": manifest["memory"]["weights_bytes"],
        "params_file_bytes": params_file,
        "input_bytes": inputs,
        "arena_bytes": manifest["memory"]["arena_bytes"],
        "arena_aligned_bytes": fn.aligned_bytes if fn is not None else None,
        "arena_blocks": fn.storage_blocks if fn is not None else 0,
        "workspace_bytes": workspace,
        "held_output_bytes": held,
        "arena_run_bytes": arena_run,
        "run_bytes": params_file + inputs + arena_run if arena_run is not None else None,
        "note": "arena: storage blocks planned per entry function (activations and outputs); the runtime's pooled "
                "allocator keeps them between runs, or they come from a caller-provided arena "
                "(edgecc_model_set_arena, arena_run_bytes); workspace: largest kernel scratch; the C API also holds "
                "params.bin and one buffer per input",
    }


# ------------------------------------------------------------------------------------------- templates


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _cmake_config(emit: str, spec: TargetSpec) -> str:
    common = f"""# find_package(edgecc_model) for this edgecc artifact (target '{spec.name}', {spec.arch}, --emit {emit}).
#   find_package(edgecc_model REQUIRED PATHS <artifact>/cmake NO_DEFAULT_PATH)
#   target_link_libraries(app PRIVATE edgecc_model::edgecc_model)
get_filename_component(EDGECC_MODEL_ROOT "${{CMAKE_CURRENT_LIST_DIR}}/.." ABSOLUTE)
set(EDGECC_MODEL_EMIT "{emit}")
set(EDGECC_MODEL_ARCH "{spec.arch}")
set(EDGECC_MODEL_INCLUDE_DIR "${{EDGECC_MODEL_ROOT}}/include")
"""
    imported_runtime = """if(NOT TARGET edgecc_model::tvm_ffi)
  add_library(edgecc_model::tvm_ffi SHARED IMPORTED)
  set_target_properties(edgecc_model::tvm_ffi PROPERTIES IMPORTED_LOCATION "${_edgecc_rt_lib}/libtvm_ffi.so"
                        IMPORTED_SONAME "libtvm_ffi.so")
  add_library(edgecc_model::tvm_runtime SHARED IMPORTED)
  set_target_properties(edgecc_model::tvm_runtime PROPERTIES IMPORTED_LOCATION "${_edgecc_rt_lib}/libtvm_runtime.so"
                        IMPORTED_SONAME "libtvm_runtime.so")
endif()
"""
    if emit == "static":
        return common + """set(_edgecc_rt_lib "${EDGECC_MODEL_ROOT}/lib")
""" + imported_runtime + """if(NOT TARGET edgecc_model::edgecc_model)
  add_library(edgecc_model::edgecc_model STATIC IMPORTED)
  # libtvm_runtime is only reached through the registry it fills when loaded: keep it (--no-as-needed)
  set_target_properties(edgecc_model::edgecc_model PROPERTIES
    IMPORTED_LOCATION "${EDGECC_MODEL_ROOT}/lib/libedgecc_model.a"
    INTERFACE_INCLUDE_DIRECTORIES "${EDGECC_MODEL_INCLUDE_DIR}"
    INTERFACE_LINK_OPTIONS "LINKER:--no-as-needed"
    INTERFACE_LINK_LIBRARIES "edgecc_model::tvm_runtime;edgecc_model::tvm_ffi;stdc++;m;pthread;dl")
endif()
set(edgecc_model_FOUND TRUE)
"""
    return common + """# A shared artifact: the app loads <artifact>/model.so at run time (edgecc_model_create). The C API is
# compiled here against the TVM runtime the firmware brings: EDGECC_TVM_RUNTIME_DIR with lib/ and include/.
if(NOT EDGECC_TVM_RUNTIME_DIR)
  set(edgecc_model_FOUND FALSE)
  set(edgecc_model_NOT_FOUND_MESSAGE
      "set EDGECC_TVM_RUNTIME_DIR to a TVM runtime for ${EDGECC_MODEL_ARCH} (lib/libtvm_runtime.so, lib/libtvm_ffi.so, include/)")
  return()
endif()
enable_language(CXX)
set(_edgecc_rt_lib "${EDGECC_TVM_RUNTIME_DIR}/lib")
""" + imported_runtime + """if(NOT TARGET edgecc_model::edgecc_model)
  add_library(edgecc_model_capi STATIC "${CMAKE_CURRENT_LIST_DIR}/edgecc_model.cc")
  target_compile_features(edgecc_model_capi PRIVATE cxx_std_17)
  set_target_properties(edgecc_model_capi PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(edgecc_model_capi PUBLIC "${EDGECC_MODEL_INCLUDE_DIR}")
  target_include_directories(edgecc_model_capi SYSTEM PRIVATE "${EDGECC_TVM_RUNTIME_DIR}/include"
                             "${CMAKE_CURRENT_LIST_DIR}/tvm_include")
  target_link_options(edgecc_model_capi INTERFACE "LINKER:--no-as-needed")
  target_link_libraries(edgecc_model_capi PUBLIC edgecc_model::tvm_runtime edgecc_model::tvm_ffi stdc++ m pthread dl)
  add_library(edgecc_model::edgecc_model ALIAS edgecc_model_capi)
endif()
set(edgecc_model_FOUND TRUE)
"""


def _makefile(emit: str, spec: TargetSpec) -> str:
    head = f"""# Makefile fragment for this edgecc artifact (target '{spec.name}', {spec.arch}, --emit {emit}).
#   include <artifact>/cmake/edgecc_model.mk        (after your first rule: it defines a rule of its own)
#   app: app.c $(EDGECC_MODEL_DEPS) ; $(CC) $(EDGECC_MODEL_CFLAGS) app.c $(EDGECC_MODEL_LIBS) -o $@
EDGECC_MODEL_DIR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
EDGECC_MODEL_CFLAGS := -I$(EDGECC_MODEL_DIR)/include
"""
    if emit == "static":
        return head + """EDGECC_MODEL_RT := $(EDGECC_MODEL_DIR)/lib
EDGECC_MODEL_DEPS := $(EDGECC_MODEL_DIR)/lib/libedgecc_model.a
EDGECC_MODEL_LIBS := $(EDGECC_MODEL_DIR)/lib/libedgecc_model.a -Wl,--no-as-needed $(EDGECC_MODEL_RT)/libtvm_runtime.so \\
  $(EDGECC_MODEL_RT)/libtvm_ffi.so -Wl,--as-needed -Wl,-rpath,$(EDGECC_MODEL_RT) -lstdc++ -lm -lpthread -ldl
"""
    return head + """# A shared artifact: the C API is compiled here (with $(CXX)) against EDGECC_TVM_RUNTIME_DIR (lib/ + include/);
# the app loads <artifact>/model.so at run time with edgecc_model_create().
EDGECC_TVM_RUNTIME_DIR ?= $(error set EDGECC_TVM_RUNTIME_DIR to a TVM runtime dir with lib/ and include/)
EDGECC_MODEL_BUILD ?= edgecc_model_build
EDGECC_MODEL_RT = $(EDGECC_TVM_RUNTIME_DIR)/lib
EDGECC_MODEL_DEPS = $(EDGECC_MODEL_BUILD)/edgecc_model.o
EDGECC_MODEL_LIBS = $(EDGECC_MODEL_BUILD)/edgecc_model.o -Wl,--no-as-needed $(EDGECC_MODEL_RT)/libtvm_runtime.so \\
  $(EDGECC_MODEL_RT)/libtvm_ffi.so -Wl,--as-needed -Wl,-rpath,$(EDGECC_MODEL_RT) -lstdc++ -lm -lpthread -ldl
$(EDGECC_MODEL_BUILD)/edgecc_model.o: $(EDGECC_MODEL_DIR)/cmake/edgecc_model.cc $(EDGECC_MODEL_DIR)/include/edgecc_model.h
\tmkdir -p $(EDGECC_MODEL_BUILD)
\t$(CXX) -std=c++17 -O2 -fPIC -c $< -I$(EDGECC_MODEL_DIR)/include -isystem $(EDGECC_TVM_RUNTIME_DIR)/include \\
\t  -isystem $(EDGECC_MODEL_DIR)/cmake/tvm_include -o $@
"""


# ------------------------------------------------------------------------------------------- static


def _linked_meta(manifest: dict, embed_params: bool, memory: dict) -> bytes:
    """The manifest subset edgecc_model_create_linked reads (same keys as manifest.json)."""
    meta = {key: manifest[key] for key in ("target", "signature", "entry", "memory")}
    meta["files"] = {"params.bin": manifest["files"]["params.bin"]}
    meta["deliverables"] = {"memory": {k: memory[k] for k in ("workspace_bytes", "arena_run_bytes", "arena_blocks")},
                            "params_embedded": embed_params}
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


_DATA_ASM = """/* generated by edgecc: linked-in manifest subset{params_note} */
  .section .note.GNU-stack,"",%progbits
  .section .rodata.edgecc_model_meta,"a"
  .globl edgecc_linked_meta
  .globl edgecc_linked_meta_end
  .balign 8
edgecc_linked_meta:
  .incbin "meta.json"
edgecc_linked_meta_end:
  .byte 0
{params}"""

_PARAMS_ASM = """  .section .rodata.edgecc_model_params,"a"
  .globl edgecc_linked_params
  .globl edgecc_linked_params_end
  .balign 64
edgecc_linked_params:
  .incbin "params.bin"
edgecc_linked_params_end:
  .byte 0
"""


def _static_library(tmp: Path, lowered, tvm_target, spec: TargetSpec, manifest: dict, embed_params: bool,
                    memory: dict, say: Say) -> None:
    from edgecc.build import compile_executable, cpu_addons

    cxx, ld, ar = _tool(spec, "g++"), _tool(spec, "ld"), _tool(spec, "ar")
    api = api_object(spec)
    with tempfile.TemporaryDirectory(prefix="edgecc-static-") as work_name:
        work = Path(work_name)
        say("system library")
        ex = compile_executable(lowered, spec, tvm_target, system_lib=True)
        ex.export_library(str(work / "model.tar"))
        objects = []
        with tarfile.open(work / "model.tar") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".o"):
                    name = f"model_{len(objects)}.o"
                    with tar.extractfile(member) as src:
                        (work / name).write_bytes(src.read())
                    objects.append(name)
        if not objects:
            raise EdgeccError("the system-library export holds no object files", "report this as an edgecc bug")
        (work / "meta.json").write_bytes(_linked_meta(manifest, embed_params, memory))
        if embed_params:
            shutil.copy(tmp / "params.bin", work / "params.bin")
        (work / "data.S").write_text(_DATA_ASM.format(
            params_note=" and params.bin" if embed_params else "", params=_PARAMS_ASM if embed_params else ""))
        _run([cxx, "-c", "data.S", "-o", "data.o"], "assembling the linked metadata", cwd=work)
        shutil.copy(api, work / "capi.o")
        for i, addon in enumerate(cpu_addons(spec)):  # the work-stealing helper the kernels call
            shutil.copy(addon, work / f"addon_{i}.o")
            objects.append(f"addon_{i}.o")
        # One relocatable object: any reference to edgecc_model_* pulls in the kernels, whose static
        # constructors register them in the system library (an archive would otherwise drop them).
        _run([ld, "-r", "-o", "edgecc_model.o", "capi.o", "data.o", *objects], "linking the model object", cwd=work)
        _run([ar, "rcsD", LIBRARY_A, "edgecc_model.o"], "archiving libedgecc_model.a", cwd=work)
        (tmp / "lib").mkdir(exist_ok=True)
        shutil.copy(work / LIBRARY_A, tmp / "lib" / LIBRARY_A)
    root = runtime_dir(spec)
    for lib in RUNTIME_LIBS:
        shutil.copyfile((root / "lib" / lib).resolve(), tmp / "lib" / lib)
        os.chmod(tmp / "lib" / lib, 0o755)


# ------------------------------------------------------------------------------------------- entry


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_options(spec: TargetSpec, emit: str, embed_params: bool) -> None:
    """Reject bad --emit/--embed-params combinations before any work starts."""
    if emit not in EMITS:
        raise EdgeccError(f"unknown --emit '{emit}'", "use " + " or ".join(EMITS))
    if embed_params and emit != "static":
        raise EdgeccError("--embed-params needs --emit static (a shared model.so reads params.bin)",
                          "add --emit static, or drop --embed-params")
    if spec.device != "cpu" and emit == "static":
        raise EdgeccError(f"--emit static supports CPU targets only, not '{spec.name}'", "use --emit shared")


def package(tmp: Path, manifest: dict, *, spec: TargetSpec, emit: str = "shared", embed_params: bool = False,
            lowered=None, tvm_target=None, say: Say | None = None) -> dict:
    """Write the firmware deliverables into the artifact temp dir; returns the manifest keys
    `deliverables` and `link`. `manifest` must already hold target, signature, entry, memory and files."""
    say = say or (lambda _m: None)
    check_options(spec, emit, embed_params)
    memory = run_memory(manifest, lowered, tvm_target)

    (tmp / "include").mkdir(exist_ok=True)
    shutil.copyfile(CAPI_DIR / HEADER, tmp / "include" / HEADER)
    _write(tmp / "cmake" / "edgecc_model-config.cmake", _cmake_config(emit, spec))
    _write(tmp / "cmake" / "edgecc_model.mk", _makefile(emit, spec))
    if emit == "shared":
        shutil.copyfile(CAPI_DIR / SOURCE, tmp / "cmake" / SOURCE)
        tvm_inc = tvm_include_dir()
        for rel in TVM_HEADERS:
            (tmp / "cmake" / TVM_INCLUDE / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tvm_inc / rel, tmp / "cmake" / TVM_INCLUDE / rel)
    else:
        _static_library(tmp, lowered, tvm_target, spec, manifest, embed_params, memory, say)

    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.parts[len(tmp.parts)] in ("include", "cmake", "lib"))
    deliverables = {
        "emit": emit,
        "params": "embedded in lib/libedgecc_model.a (params.bin kept for host tools)" if embed_params
        else "params.bin",
        "files": {p.relative_to(tmp).as_posix(): _file_entry(p) for p in files},
        "memory": memory,
    }
    if emit == "static":
        libs = [f"lib/{LIBRARY_A}", *(f"lib/{n}" for n in RUNTIME_LIBS)]
        link = {
            "runtime_kind": "shared",
            "runtime_note": "no static libtvm_runtime.a exists for this TVM build (wheel or cross runtime): the "
                            "runtime .so files are shipped in lib/ and must be deployed next to the firmware",
            "libraries": [{"file": f, "bytes": (tmp / f).stat().st_size} for f in libs],
            "system_libraries": list(SYSTEM_LIBS),
            "flags": f"lib/{LIBRARY_A} -Wl,--no-as-needed lib/libtvm_runtime.so lib/libtvm_ffi.so -Wl,--as-needed "
                     "-lstdc++ -lm -lpthread -ldl",
            "compiler": spec.cross_compiler or "g++",
        }
    else:
        link = {
            "runtime_kind": "shared",
            "runtime_note": "model.so is loaded at run time; link the C API (cmake/edgecc_model.cc) against "
                            "libtvm_runtime.so and libtvm_ffi.so for " + spec.arch,
            "libraries": [],
            "system_libraries": list(SYSTEM_LIBS),
            "flags": "-Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,--as-needed -lstdc++ -lm -lpthread -ldl",
            "compiler": spec.cross_compiler or "g++",
        }
    return {"deliverables": deliverables, "link": link}
