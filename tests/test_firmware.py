"""Firmware deliverables: `--emit static|shared`, the C API (edgecc_model.h), the C example.

The C example (examples/c/edgecc_run.c) is built with the artifact's Makefile fragment or CMake package, for
the host and, with Debian's cross compilers, for arm-neon and riscv64-rvv (run under qemu-user); its outputs
are compared with onnxruntime. Error handling of the C API and the memory plan are checked on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import double_build_digests
from edgecc.build import build_artifact
from edgecc.errors import EdgeccError
from edgecc.models.registry import MODELS
from edgecc.runtime_bridge import firmware
from edgecc.targets.registry import get_target

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "c"
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []


def _need_cross(target: str):
    spec = get_target(target)
    if not spec.is_cross:
        return spec
    for tool in (spec.cross_compiler, spec.emulator[0]):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (scripts/install.sh installs it)")
    from edgecc.runtime_bridge import cross_runtime

    if cross_runtime.runtime_dir(spec.arch) is None:
        pytest.skip(f"no {spec.arch} TVM runtime: run `{cross_runtime.install_command(spec.arch)}`")
    return spec


def _compilers(spec) -> dict[str, str]:
    cxx = spec.cross_compiler or "g++"
    return {"CC": cxx[: -len("g++")] + "gcc", "CXX": cxx}


def build_example(artifact: Path, spec, out: Path, runtime_dir: Path | None = None) -> Path:
    """examples/c built with <artifact>/cmake/edgecc_model.mk (C99, -Wall -Wextra -Werror)."""
    cmd = [*NICE, "make", "-s", "-C", str(EXAMPLE), f"ARTIFACT={artifact}", f"BIN={out}",
           f"EDGECC_MODEL_BUILD={out.parent / (out.name + '-capi')}"]
    cmd += [f"{k}={v}" for k, v in _compilers(spec).items()]
    if runtime_dir is not None:
        cmd.append(f"EDGECC_TVM_RUNTIME_DIR={runtime_dir}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_example(spec, binary: Path, args: list[str], env: dict | None = None, timeout: float = 900):
    cmd = [*(spec.emulator if spec.is_cross else ()), str(binary), *args]
    full_env = {**os.environ, "TVM_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_inputs(path: Path, manifest: dict, feeds: dict[str, np.ndarray]) -> None:
    blobs = []
    for sig in manifest["signature"]["built"]["inputs"]:
        arr = np.ascontiguousarray(feeds[sig["name"]], dtype=np.dtype(sig["dtype"]).newbyteorder("<"))
        assert list(arr.shape) == sig["shape"]
        blobs.append(arr.tobytes())
    path.write_bytes(b"".join(blobs))


def read_outputs(path: Path, manifest: dict) -> list[np.ndarray]:
    data, pos, out = path.read_bytes(), 0, []
    for sig in manifest["signature"]["built"]["outputs"]:
        dtype = np.dtype(sig["dtype"]).newbyteorder("<")
        n = int(np.prod(sig["shape"], dtype=np.int64)) * dtype.itemsize
        out.append(np.frombuffer(data[pos:pos + n], dtype=dtype).reshape(sig["shape"]))
        pos += n
    assert pos == len(data)
    return out


def onnxruntime_outputs(onnx_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Max abs error over all outputs (after asserting closeness)."""
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        a, b = a.astype(np.float64), np.asarray(b, dtype=np.float64).reshape(a.shape)
        err = float(np.abs(a - b).max()) if a.size else 0.0
        worst = max(worst, err)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    return worst


def _run_and_verify(name: str, target: str, tmp: Path, emit_args: dict, linked: str | None,
                    arena: bool = False) -> float:
    spec = _need_cross(target)
    model = MODELS[name]
    onnx_path = model.export(tmp / f"{name}.onnx")
    artifact = tmp / f"{name}-{target}"
    result = build_artifact(onnx_path, artifact, target=target, **emit_args)
    binary = build_example(artifact, spec, tmp / f"edgecc_run-{target}")
    feeds = model.feeds(seed=0)
    write_inputs(tmp / "in.bin", result.manifest, feeds)
    args = ["--linked", linked] if linked is not None else [str(artifact)]
    proc = run_example(spec, binary, [*args, str(tmp / "in.bin"), str(tmp / "out.bin")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = read_outputs(tmp / "out.bin", result.manifest)
    err = compare(ours, onnxruntime_outputs(onnx_path, feeds))
    print(f"{name} {target} C example vs onnxruntime: max abs err {err:.3g}")
    if arena:  # the same run from a caller-provided arena (edgecc_model_set_arena): the same bytes
        proc = run_example(spec, binary, ["--arena", *args, str(tmp / "in.bin"), str(tmp / "out-arena.bin"), "2"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "caller-provided" in proc.stdout
        for a, b in zip(read_outputs(tmp / "out-arena.bin", result.manifest), ours, strict=True):
            np.testing.assert_array_equal(a, b)
    return err


# ------------------------------------------------------------------------------------------ options


def test_default_build_adds_c_api(tiny_mlp_artifact):
    manifest = json.loads((tiny_mlp_artifact / "manifest.json").read_text())
    assert (tiny_mlp_artifact / "include" / "edgecc_model.h").is_file()
    assert (tiny_mlp_artifact / "cmake" / "edgecc_model-config.cmake").is_file()
    assert (tiny_mlp_artifact / "cmake" / "edgecc_model.mk").is_file()
    assert not (tiny_mlp_artifact / "lib").exists()
    assert manifest["deliverables"]["emit"] == "shared"
    assert "include/edgecc_model.h" in manifest["deliverables"]["files"]
    assert manifest["deliverables"]["memory"]["weights_bytes"] == manifest["memory"]["weights_bytes"]


def test_embed_params_needs_static(tiny_mlp, tmp_path, cli):
    with pytest.raises(EdgeccError, match="--embed-params needs --emit static"):
        build_artifact(tiny_mlp, tmp_path / "out", embed_params=True)
    res = cli("build", tiny_mlp, "-o", tmp_path / "o2", "--emit", "bogus")
    assert res.exit_code != 0
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ host


@pytest.fixture(scope="module")
def squeezenet_static(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sq")
    onnx_path = MODELS["squeezenet-rw"].export(tmp / "squeezenet.onnx")
    result = build_artifact(onnx_path, tmp / "artifact", target="host", emit="static")
    return onnx_path, result.out_dir, result.manifest


def test_static_artifact_layout(squeezenet_static):
    _, artifact, manifest = squeezenet_static
    link = manifest["link"]
    files = [lib["file"] for lib in link["libraries"]]
    assert files == ["lib/libedgecc_model.a", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so"]
    for lib in link["libraries"]:
        assert (artifact / lib["file"]).stat().st_size == lib["bytes"]
    assert link["runtime_kind"] == "shared" and "no static libtvm_runtime.a" in link["runtime_note"]
    for rel, info in manifest["deliverables"]["files"].items():
        assert hashlib.sha256((artifact / rel).read_bytes()).hexdigest() == info["sha256"]


def test_c_example_cmake_host(squeezenet_static, tmp_path):
    """find_package(edgecc_model) + target_link_libraries: the two lines of a firmware CMake project."""
    onnx_path, artifact, manifest = squeezenet_static
    build = tmp_path / "build"
    proc = subprocess.run([*NICE, "cmake", "-S", str(EXAMPLE), "-B", str(build),
                           f"-Dedgecc_model_DIR={artifact / 'cmake'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*NICE, "cmake", "--build", str(build)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    feeds = MODELS["squeezenet-rw"].feeds(seed=0)
    write_inputs(tmp_path / "in.bin", manifest, feeds)
    proc = run_example(get_target("host"), build / "edgecc_run",
                       ["--linked", str(artifact / "params.bin"), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
    assert proc.returncode == 0, proc.stderr
    err = compare(read_outputs(tmp_path / "out.bin", manifest), onnxruntime_outputs(onnx_path, feeds))
    print(f"squeezenet host (cmake, static) max abs err {err:.3g}")


def test_c_example_shared_host(tiny_mlp, tiny_mlp_artifact, tmp_path):
    """A shared artifact: the API compiled by the firmware build, model.so loaded at run time."""
    from tests.conftest import feeds_for_two_heads

    spec = get_target("host")
    manifest = json.loads((tiny_mlp_artifact / "manifest.json").read_text())
    binary = build_example(tiny_mlp_artifact, spec, tmp_path / "edgecc_run", runtime_dir=firmware.runtime_dir(spec))
    feeds = feeds_for_two_heads()
    write_inputs(tmp_path / "in.bin", manifest, feeds)
    proc = run_example(spec, binary, [str(tiny_mlp_artifact), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
    assert proc.returncode == 0, proc.stderr
    assert "ok: 2 inputs, 2 outputs" in proc.stdout
    compare(read_outputs(tmp_path / "out.bin", manifest), onnxruntime_outputs(tiny_mlp, feeds))


ALLOC_COUNTER = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);
static long long live, peak, calls, total, large;
static void add(void* p) {
  long long v, q, n;
  if (!p) return;
  n = (long long)malloc_usable_size(p);
  v = __atomic_add_fetch(&live, n, __ATOMIC_RELAXED);
  while (v > (q = __atomic_load_n(&peak, __ATOMIC_RELAXED)) &&
         !__atomic_compare_exchange_n(&peak, &q, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&total, n, __ATOMIC_RELAXED);
  if (n >= 4096) __atomic_add_fetch(&large, 1, __ATOMIC_RELAXED);
}
static void sub(void* p) { if (p) __atomic_sub_fetch(&live, (long long)malloc_usable_size(p), __ATOMIC_RELAXED); }
void* malloc(size_t n) { void* p = __libc_malloc(n); add(p); return p; }
void* calloc(size_t a, size_t b) { void* p = __libc_calloc(a, b); add(p); return p; }
void* realloc(void* o, size_t n) { void* p; sub(o); p = __libc_realloc(o, n); if (p) add(p); else if (o && n) add(o); return p; }
void free(void* p) { sub(p); __libc_free(p); }
void* memalign(size_t a, size_t n) { void* p = __libc_memalign(a, n); add(p); return p; }
void* aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
int posix_memalign(void** out, size_t a, size_t n) { void* p = memalign(a, n); if (!p) return ENOMEM; *out = p; return 0; }
__attribute__((destructor)) static void report(void) {
  FILE* f = fopen(getenv("EDGECC_ALLOC_REPORT"), "w");
  if (!f) return;
  fprintf(f, "{\"peak_bytes\": %lld, \"live_bytes_at_exit\": %lld, \"allocations\": %lld, \"allocated_bytes\": %lld, "
             "\"allocations_4k_or_more\": %lld}\n", peak, live, calls, total, large);
  fclose(f);
}
"""


@pytest.fixture(scope="module")
def heap_runs(squeezenet_static, tmp_path_factory):
    """The C example under an LD_PRELOAD malloc counter: runtime allocation and --arena, 1 and 4 runs."""
    onnx_path, artifact, manifest = squeezenet_static
    tmp = tmp_path_factory.mktemp("heap")
    (tmp / "counter.c").write_text(ALLOC_COUNTER)
    counter = tmp / "counter.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(tmp / "counter.c"), "-o", str(counter)], check=True)
    binary = build_example(artifact, get_target("host"), tmp / "edgecc_run")
    feeds = MODELS["squeezenet-rw"].feeds(seed=0)
    write_inputs(tmp / "in.bin", manifest, feeds)
    runs = {}
    for mode in ("runtime", "arena"):
        for repeat in (1, 4):
            report, out = tmp / f"alloc-{mode}-{repeat}.json", tmp / f"out-{mode}-{repeat}.bin"
            args = ["--arena"] if mode == "arena" else []
            args += ["--linked", str(artifact / "params.bin"), str(tmp / "in.bin"), str(out), str(repeat)]
            proc = run_example(get_target("host"), binary, args,
                               env={"LD_PRELOAD": str(counter), "EDGECC_ALLOC_REPORT": str(report)})
            assert proc.returncode == 0, proc.stderr
            runs[mode, repeat] = {**json.loads(report.read_text()), "stdout": proc.stdout,
                                  "outputs": read_outputs(out, manifest)}
    return manifest, runs, onnxruntime_outputs(onnx_path, feeds)


def test_peak_heap_matches_manifest(heap_runs):
    """Peak heap of the C example (LD_PRELOAD malloc counter) vs the manifest's plan, within 10 %.

    valgrind massif cannot run the host build here: valgrind 3.19 does not decode the AVX-512 the host
    (znver4) kernels use. The counter sees the same heap (params.bin, input buffers, the storage blocks TVM's
    pooled allocator keeps, the workspace pool, the runtime's own tables)."""
    manifest, runs, ref = heap_runs
    mem = manifest["deliverables"]["memory"]
    assert mem["params_file_bytes"] == manifest["files"]["params.bin"]["bytes"]
    assert mem["arena_run_bytes"] == mem["arena_aligned_bytes"] + mem["workspace_bytes"] + mem["held_output_bytes"]
    planned = mem["run_bytes"]
    assert planned == mem["params_file_bytes"] + mem["input_bytes"] + mem["arena_run_bytes"]
    for repeat in (1, 4):
        measured = runs["runtime", repeat]["peak_bytes"]
        print(f"runtime allocation, {repeat} run(s): planned {planned} (params.bin {mem['params_file_bytes']}, inputs "
              f"{mem['input_bytes']}, arena {mem['arena_aligned_bytes']}, workspace {mem['workspace_bytes']}, held "
              f"outputs {mem['held_output_bytes']}); measured peak heap {measured} ({measured / planned - 1:+.1%})")
        assert abs(measured - planned) <= 0.10 * planned
        compare(runs["runtime", repeat]["outputs"], ref)
    # the pooled allocator keeps the blocks: later runs add no tensor memory, but for one more block per output
    # in the second run (the VM still holds the first run's outputs while the second allocates its own)
    assert runs["runtime", 4]["peak_bytes"] - runs["runtime", 1]["peak_bytes"] < 64 * 1024
    n_out = len(manifest["signature"]["built"]["outputs"])
    assert runs["runtime", 4]["allocations_4k_or_more"] - runs["runtime", 1]["allocations_4k_or_more"] <= n_out


def test_caller_arena_keeps_runs_off_the_heap(heap_runs):
    """--arena: edgecc_model_set_arena with edgecc_model_arena_bytes; every tensor of a run comes from it."""
    manifest, runs, ref = heap_runs
    mem = manifest["deliverables"]["memory"]
    arena_bytes = mem["arena_run_bytes"] + 64  # edgecc_model_arena_bytes: + alignment slack
    planned = mem["run_bytes"] + 64
    for repeat in (1, 4):
        run = runs["arena", repeat]
        assert f"arena: {arena_bytes} bytes, caller-provided" in run["stdout"]
        used = int(run["stdout"].split("arena: ", 2)[2].split(" of ")[0])
        print(f"arena, {repeat} run(s): arena {arena_bytes}, high-water {used}; planned heap {planned}, measured "
              f"peak {run['peak_bytes']} ({run['peak_bytes'] / planned - 1:+.1%}); per extra run "
              f"{(runs['arena', 4]['allocated_bytes'] - runs['arena', 1]['allocated_bytes']) / 3:.0f} bytes in "
              f"{(runs['arena', 4]['allocations'] - runs['arena', 1]['allocations']) / 3:.0f} mallocs")
        assert 0.9 * mem["arena_run_bytes"] <= used <= arena_bytes
        assert abs(run["peak_bytes"] - planned) <= 0.10 * planned
        for ours, theirs in zip(run["outputs"], runs["runtime", 1]["outputs"], strict=True):
            np.testing.assert_array_equal(ours, theirs)
        compare(run["outputs"], ref)
    # no tensor memory from the heap in a run: extra runs allocate only the VM's small bookkeeping objects
    extra = runs["arena", 4]
    assert extra["peak_bytes"] == runs["arena", 1]["peak_bytes"]
    assert extra["allocations_4k_or_more"] == runs["arena", 1]["allocations_4k_or_more"]
    assert (extra["allocated_bytes"] - runs["arena", 1]["allocated_bytes"]) / 3 < 16 * 1024


def _massif_peak(path: Path) -> int:
    """Largest `mem_heap_B` (bytes the program asked for) over massif's snapshots (it always takes the peak)."""
    return max(int(line.split("=")[1]) for line in path.read_text().splitlines() if line.startswith("mem_heap_B="))


@pytest.mark.slow
def test_massif_peak_matches_manifest(tmp_path):
    """The same check under `valgrind --tool=massif`, on an x86-avx2 build (valgrind 3.19 does not decode the
    AVX-512 of the host build): runtime allocation and a caller-provided arena, one run each (~1 min)."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (scripts/install.sh installs it)")
    onnx_path = MODELS["squeezenet-rw"].export(tmp_path / "squeezenet.onnx")
    result = build_artifact(onnx_path, tmp_path / "artifact", target="x86-avx2", emit="static")
    artifact, manifest = result.out_dir, result.manifest
    binary = build_example(artifact, get_target("x86-avx2"), tmp_path / "edgecc_run")
    feeds = MODELS["squeezenet-rw"].feeds(seed=0)
    write_inputs(tmp_path / "in.bin", manifest, feeds)
    mem = manifest["deliverables"]["memory"]
    ref = onnxruntime_outputs(onnx_path, feeds)
    for mode, extra, planned in (("runtime", [], mem["run_bytes"]), ("arena", ["--arena"], mem["run_bytes"] + 64)):
        out = tmp_path / f"massif-{mode}.out"
        cmd = ["valgrind", "--tool=massif", f"--massif-out-file={out}", str(binary), *extra, "--linked",
               str(artifact / "params.bin"), str(tmp_path / "in.bin"), str(tmp_path / f"out-{mode}.bin")]
        proc = subprocess.run([*NICE, *cmd], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "TVM_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        compare(read_outputs(tmp_path / f"out-{mode}.bin", manifest), ref)
        peak = _massif_peak(out)
        print(f"massif, {mode}: planned {planned}, peak heap {peak} ({peak / planned - 1:+.1%}); "
              f"`{' '.join(cmd)}`")
        assert abs(peak - planned) <= 0.10 * planned


def test_arena_too_small_is_reported(tiny_mlp_artifact, tmp_path):
    """A run that outgrows the caller's arena fails with EDGECC_ERR_OUT_OF_MEMORY; nothing crashes."""
    spec = get_target("host")
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_mlp_artifact, artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["deliverables"]["memory"]["arena_run_bytes"] > 128
    manifest["deliverables"]["memory"]["arena_run_bytes"] = 64  # a plan that understates the run
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    binary = build_example(artifact, spec, tmp_path / "edgecc_run", runtime_dir=firmware.runtime_dir(spec))
    from tests.conftest import feeds_for_two_heads

    write_inputs(tmp_path / "in.bin", manifest, feeds_for_two_heads())
    proc = run_example(spec, binary, ["--arena", str(artifact), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "run: EDGECC_ERR_OUT_OF_MEMORY: the arena is too small" in proc.stderr


CHECK_ERRORS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "edgecc_model.h"
static void report(const char* what, edgecc_status st) {
  printf("%s %s %s\n", what, edgecc_status_name(st), st == EDGECC_OK ? "-" : edgecc_last_error());
}
int main(int argc, char** argv) {
  /* argv: good params.bin, corrupted params.bin, other-target artifact dir, corrupted artifact dir */
  edgecc_model* m = NULL;
  edgecc_model* bad = NULL;
  edgecc_tensor_info info;
  static unsigned char buf[1 << 20];
  size_t n = 0;
  const void* p = NULL;
  if (argc != 5) return 2;
  report("create_null_out", edgecc_model_create_linked(argv[1], NULL));
  report("create_null_dir", edgecc_model_create(NULL, &bad));
  report("create_missing_dir", edgecc_model_create("/nonexistent/artifact", &bad));
  report("create_corrupted_params_linked", edgecc_model_create_linked(argv[2], &bad));
  report("create_other_target", edgecc_model_create(argv[3], &bad));
  report("create_corrupted_params_dir", edgecc_model_create(argv[4], &bad));
  report("create_missing_params", edgecc_model_create_linked("/nonexistent/params.bin", &bad));
  report("create_not_embedded", edgecc_model_create_linked(NULL, &bad));
  report("bad_is_null", bad == NULL ? EDGECC_OK : EDGECC_ERR_STATE);
  report("create_ok", edgecc_model_create_linked(argv[1], &m));
  report("num_inputs_null_model", edgecc_model_num_inputs(NULL, &n));
  report("num_inputs_null_count", edgecc_model_num_inputs(m, NULL));
  report("input_info_bad_index", edgecc_model_input_info(m, 7, &info));
  report("output_info_null", edgecc_model_output_info(m, 0, NULL));
  report("run_before_inputs", edgecc_model_run(m));
  report("get_output_before_run", edgecc_model_get_output(m, 0, buf, 4000));
  report("set_input_bad_index", edgecc_model_set_input(m, 1, buf, 602112));
  report("set_input_bad_size", edgecc_model_set_input(m, 0, buf, 602111));
  report("set_input_null_data", edgecc_model_set_input(m, 0, NULL, 602112));
  report("set_input_null_model", edgecc_model_set_input(NULL, 0, buf, 602112));
  report("set_input_ok", edgecc_model_set_input(m, 0, buf, 602112));
  report("run_ok", edgecc_model_run(m));
  report("get_output_bad_size", edgecc_model_get_output(m, 0, buf, 3999));
  report("get_output_bad_index", edgecc_model_get_output(m, 1, buf, 4000));
  report("get_output_null", edgecc_model_get_output(m, 0, NULL, 4000));
  report("output_data_null", edgecc_model_output_data(m, 0, &p, NULL));
  report("get_output_ok", edgecc_model_get_output(m, 0, buf, 4000));
  report("run_null", edgecc_model_run(NULL));
  /* caller-provided arena */
  report("arena_bytes_null", edgecc_model_arena_bytes(m, NULL));
  report("arena_bytes_ok", edgecc_model_arena_bytes(m, &n));
  report("arena_used_without_arena", edgecc_model_arena_used(m, &n));
  report("set_arena_null_buffer", edgecc_model_set_arena(m, NULL, 4096));
  report("set_arena_too_small", edgecc_model_set_arena(m, buf, sizeof buf));
  report("set_arena_null_model", edgecc_model_set_arena(NULL, buf, sizeof buf));
  {
    size_t need = 0, used = 0;
    unsigned char* arena;
    static unsigned char first[4000], second[4000];
    edgecc_model_get_output(m, 0, first, sizeof first);
    edgecc_model_arena_bytes(m, &need);
    arena = (unsigned char*)malloc(need + 1);
    report("set_arena_ok", edgecc_model_set_arena(m, arena + 1, need)); /* unaligned on purpose */
    report("get_output_after_set_arena", edgecc_model_get_output(m, 0, second, sizeof second));
    report("run_arena_ok", edgecc_model_run(m));
    report("run_arena_again", edgecc_model_run(m));
    report("arena_used_ok", edgecc_model_arena_used(m, &used));
    report("arena_used_fits", used > 0 && used <= need ? EDGECC_OK : EDGECC_ERR_SIZE);
    edgecc_model_get_output(m, 0, second, sizeof second);
    report("arena_same_output", memcmp(first, second, sizeof first) == 0 ? EDGECC_OK : EDGECC_ERR_STATE);
    report("unset_arena", edgecc_model_set_arena(m, NULL, 0));
    free(arena);
    report("run_after_unset", edgecc_model_run(m));
  }
  /* zero-copy inputs: the run reads the caller's buffer itself (4 bytes past a 64-byte boundary on purpose) */
  {
    size_t i, align = 0;
    static unsigned char copied[4000], bound[4000];
    unsigned char* mem = (unsigned char*)malloc(602112 + 128);
    unsigned char* base = mem + (64 - (size_t)mem % 64) % 64;
    float* x = (float*)(base + 4);
    for (i = 0; i < 602112 / 4; ++i) x[i] = (float)(i % 97) / 97.0f;
    report("input_alignment_ok", edgecc_model_input_alignment(m, 0, &align));
    report("input_alignment_is_element", align == 4 ? EDGECC_OK : EDGECC_ERR_STATE);
    report("input_alignment_bad_index", edgecc_model_input_alignment(m, 1, &align));
    report("bind_input_bad_index", edgecc_model_bind_input(m, 1, x, 602112));
    report("bind_input_bad_size", edgecc_model_bind_input(m, 0, x, 602108));
    report("bind_input_null_data", edgecc_model_bind_input(m, 0, NULL, 602112));
    report("bind_input_null_model", edgecc_model_bind_input(NULL, 0, x, 602112));
    report("bind_input_misaligned", edgecc_model_bind_input(m, 0, base + 2, 602112));
    edgecc_model_set_input(m, 0, x, 602112);
    edgecc_model_run(m);
    edgecc_model_get_output(m, 0, copied, sizeof copied);
    report("bind_input_ok", edgecc_model_bind_input(m, 0, x, 602112));
    report("run_bound_ok", edgecc_model_run(m));
    edgecc_model_get_output(m, 0, bound, sizeof bound);
    report("bound_same_output", memcmp(copied, bound, sizeof bound) == 0 ? EDGECC_OK : EDGECC_ERR_STATE);
    for (i = 0; i < 602112 / 4; ++i) x[i] = 1.0f - x[i]; /* new data, no API call: the next run must see it */
    report("run_bound_again", edgecc_model_run(m));
    edgecc_model_get_output(m, 0, bound, sizeof bound);
    report("bound_output_changed", memcmp(copied, bound, sizeof bound) != 0 ? EDGECC_OK : EDGECC_ERR_STATE);
    edgecc_model_set_input(m, 0, x, 602112); /* back to the model's own buffer, same data */
    edgecc_model_run(m);
    edgecc_model_get_output(m, 0, copied, sizeof copied);
    report("bound_equals_copied", memcmp(copied, bound, sizeof bound) == 0 ? EDGECC_OK : EDGECC_ERR_STATE);
    for (i = 0; i < 602112 / 4; ++i) x[i] = 0.5f; /* no longer bound: the model's copy is what runs */
    edgecc_model_run(m);
    edgecc_model_get_output(m, 0, bound, sizeof bound);
    report("set_input_unbinds", memcmp(copied, bound, sizeof bound) == 0 ? EDGECC_OK : EDGECC_ERR_STATE);
    free(mem);
  }
  edgecc_model_destroy(m);
  edgecc_model_destroy(NULL);
  report("status_name_unknown", strcmp(edgecc_status_name((edgecc_status)99), "EDGECC_ERR_UNKNOWN") ? EDGECC_ERR_STATE : EDGECC_OK);
  return 0;
}
"""

EXPECTED_ERRORS = {
    "create_null_out": "EDGECC_ERR_NULL_POINTER", "create_null_dir": "EDGECC_ERR_NULL_POINTER",
    "create_missing_dir": "EDGECC_ERR_IO", "create_corrupted_params_linked": "EDGECC_ERR_HASH_MISMATCH",
    "create_other_target": "EDGECC_ERR_TARGET_MISMATCH", "create_corrupted_params_dir": "EDGECC_ERR_HASH_MISMATCH",
    "create_missing_params": "EDGECC_ERR_IO", "create_not_embedded": "EDGECC_ERR_NOT_LINKED",
    "bad_is_null": "EDGECC_OK", "create_ok": "EDGECC_OK",
    "num_inputs_null_model": "EDGECC_ERR_NULL_POINTER", "num_inputs_null_count": "EDGECC_ERR_NULL_POINTER",
    "input_info_bad_index": "EDGECC_ERR_INDEX", "output_info_null": "EDGECC_ERR_NULL_POINTER",
    "run_before_inputs": "EDGECC_ERR_STATE", "get_output_before_run": "EDGECC_ERR_STATE",
    "set_input_bad_index": "EDGECC_ERR_INDEX", "set_input_bad_size": "EDGECC_ERR_SIZE",
    "set_input_null_data": "EDGECC_ERR_NULL_POINTER", "set_input_null_model": "EDGECC_ERR_NULL_POINTER",
    "set_input_ok": "EDGECC_OK", "run_ok": "EDGECC_OK", "get_output_bad_size": "EDGECC_ERR_SIZE",
    "get_output_bad_index": "EDGECC_ERR_INDEX", "get_output_null": "EDGECC_ERR_NULL_POINTER",
    "output_data_null": "EDGECC_ERR_NULL_POINTER", "get_output_ok": "EDGECC_OK", "run_null": "EDGECC_ERR_NULL_POINTER",
    "arena_bytes_null": "EDGECC_ERR_NULL_POINTER", "arena_bytes_ok": "EDGECC_OK",
    "arena_used_without_arena": "EDGECC_ERR_STATE", "set_arena_null_buffer": "EDGECC_ERR_NULL_POINTER",
    "set_arena_too_small": "EDGECC_ERR_SIZE", "set_arena_null_model": "EDGECC_ERR_NULL_POINTER",
    "set_arena_ok": "EDGECC_OK", "get_output_after_set_arena": "EDGECC_ERR_STATE", "run_arena_ok": "EDGECC_OK",
    "run_arena_again": "EDGECC_OK", "arena_used_ok": "EDGECC_OK", "arena_used_fits": "EDGECC_OK",
    "arena_same_output": "EDGECC_OK", "unset_arena": "EDGECC_OK", "run_after_unset": "EDGECC_OK",
    "status_name_unknown": "EDGECC_OK",
    "input_alignment_ok": "EDGECC_OK", "input_alignment_is_element": "EDGECC_OK",
    "input_alignment_bad_index": "EDGECC_ERR_INDEX", "bind_input_bad_index": "EDGECC_ERR_INDEX",
    "bind_input_bad_size": "EDGECC_ERR_SIZE", "bind_input_null_data": "EDGECC_ERR_NULL_POINTER",
    "bind_input_null_model": "EDGECC_ERR_NULL_POINTER", "bind_input_misaligned": "EDGECC_ERR_ALIGNMENT",
    "bind_input_ok": "EDGECC_OK", "run_bound_ok": "EDGECC_OK", "bound_same_output": "EDGECC_OK",
    "run_bound_again": "EDGECC_OK", "bound_output_changed": "EDGECC_OK", "bound_equals_copied": "EDGECC_OK",
    "set_input_unbinds": "EDGECC_OK",
}


def test_c_api_rejects_bad_input(squeezenet_static, tmp_path):
    _, artifact, manifest = squeezenet_static
    assert manifest["signature"]["built"]["inputs"][0]["shape"] == [1, 3, 224, 224]
    # a corrupted params.bin: one flipped byte in the weights
    corrupted = tmp_path / "corrupted"
    shutil.copytree(artifact, corrupted)
    data = bytearray((corrupted / "params.bin").read_bytes())
    data[len(data) // 2] ^= 0x40
    (corrupted / "params.bin").write_bytes(bytes(data))
    # an artifact for another target (aarch64 manifest; nothing else is read before the check)
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((artifact / "manifest.json").read_text())
    m["target"].update(name="arm-neon", arch="aarch64")
    (other / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "check.c").write_text(CHECK_ERRORS)
    make_vars = (artifact / "cmake" / "edgecc_model.mk").read_text()
    assert "EDGECC_MODEL_LIBS" in make_vars
    libs = [str(artifact / "lib" / "libedgecc_model.a"), "-Wl,--no-as-needed", str(artifact / "lib" / "libtvm_runtime.so"),
            str(artifact / "lib" / "libtvm_ffi.so"), "-Wl,--as-needed", f"-Wl,-rpath,{artifact / 'lib'}",
            "-lstdc++", "-lm", "-lpthread", "-ldl"]
    subprocess.run([*NICE, "gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{artifact / 'include'}",
                    str(tmp_path / "check.c"), *libs, "-o", str(tmp_path / "check")], check=True)
    proc = run_example(get_target("host"), tmp_path / "check",
                       [str(artifact / "params.bin"), str(corrupted / "params.bin"), str(other), str(corrupted)])
    assert proc.returncode == 0, proc.stderr
    got = {line.split(" ", 2)[0]: line.split(" ", 2)[1:] for line in proc.stdout.splitlines()}
    assert {k: v[0] for k, v in got.items()} == EXPECTED_ERRORS
    assert "built for aarch64" in got["create_other_target"][1]
    assert "does not match the manifest" in got["create_corrupted_params_dir"][1]
    assert "takes 602112 bytes, got 602111" in got["set_input_bad_size"][1]
    assert "out of range" in got["input_info_bad_index"][1]
    assert "the model needs" in got["set_arena_too_small"][1]
    assert manifest["signature"]["input_alignment"] == "element"
    assert "not a multiple of 4 bytes" in got["bind_input_misaligned"][1]


# ------------------------------------------------------------------------------------------ reproducible


def test_static_builds_are_byte_identical(tmp_path, monkeypatch):
    """--emit static --embed-params twice, in other directories at other times: the same bytes everywhere."""
    digests = double_build_digests(tmp_path, monkeypatch, target="host", emit="static", embed_params=True)
    assert digests[0] == digests[1]
    assert {"lib/libedgecc_model.a", "lib/libtvm_runtime.so", "include/edgecc_model.h",
            "cmake/edgecc_model-config.cmake", "cmake/edgecc_model.mk"} <= set(digests[0])


# ------------------------------------------------------------------------------------------ cross / slow


@pytest.mark.cross
@pytest.mark.parametrize("target", ["arm-neon", pytest.param("riscv64-rvv", marks=pytest.mark.slow)])
def test_c_example_cross_squeezenet(target, tmp_path):
    """Static, weights linked in (arm-neon) or from params.bin (riscv64), run under qemu-user; then again from a
    caller-provided arena (the C API's DeviceAPI override on the target's runtime), bit-identical."""
    embed = target == "arm-neon"
    _run_and_verify("squeezenet-rw", target, tmp_path, {"emit": "static", "embed_params": embed},
                    linked="-" if embed else str(tmp_path / f"squeezenet-rw-{target}" / "params.bin"), arena=True)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", pytest.param("arm-neon", marks=pytest.mark.cross),
                                    pytest.param("riscv64-rvv", marks=pytest.mark.cross)])
def test_c_example_minilm(target, tmp_path):
    _run_and_verify("minilm", target, tmp_path, {"emit": "static"},
                    linked=str(tmp_path / f"minilm-{target}" / "params.bin"))
