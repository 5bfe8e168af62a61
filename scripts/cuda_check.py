#!/usr/bin/env python3
"""Run CUDA artifacts on a GPU machine and compare them with onnxruntime (CPU).

    python scripts/cuda_check.py DIR

DIR holds, per model, `<name>.cuda/` (an artifact from `edgecc build -t cuda`), `<name>.onnx` and
`<name>.feeds.npz`. Only TVM's runtime is needed on the GPU machine (TVM_USE_RUNTIME_LIB=1 and a TVM
package without libtvm_compiler.so will do), because the artifacts are compiled elsewhere. The script
loads TVM's CUDA runtime library itself, so `tvm.cuda()` works without the compiler library.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import time
from pathlib import Path


def _load_cuda_runtime() -> None:
    import tvm

    for pattern in ("libcudart.so.13*", "libcudart.so.12*"):
        for base in sys.path + ["/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]:
            hits = sorted(glob.glob(os.path.join(base, "**", pattern), recursive=True))
            if hits:
                ctypes.CDLL(hits[0], mode=ctypes.RTLD_GLOBAL)
                break
        else:
            continue
        break
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _register_nvcc_jit()


def _register_nvcc_jit() -> None:
    """TVM 0.27 artifacts carry CUDA C source and compile it when loaded, through the Python callback
    `tvm_callback_cuda_compile`; TVM's own callback needs the compiler library. This one runs nvcc."""
    import subprocess
    import tempfile

    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_args):
        arch = os.environ.get("EDGECC_CUDA_ARCH", "native")
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "k.cu", Path(tmp) / "k.fatbin"
            src.write_text(str(code))
            subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o", str(out), str(src)], check=True)
            return bytearray(out.read_bytes())


def main(directory: str) -> int:
    import numpy as np

    _load_cuda_runtime()
    import tvm

    from edgecc.runtime_bridge.host import load_artifact
    from edgecc.runtime_bridge.verify import compare, onnxruntime_reference

    print(f"GPU present: {tvm.cuda(0).exist}, name: {tvm.cuda(0).device_name if tvm.cuda(0).exist else '-'}")
    failed = 0
    for art in sorted(Path(directory).glob("*.cuda")):
        name = art.name[: -len(".cuda")]
        with np.load(Path(directory) / f"{name}.feeds.npz") as data:
            feeds = {k: data[k] for k in data.files}
        model = load_artifact(art)
        got = model.run(feeds)
        ref = onnxruntime_reference(Path(directory) / f"{name}.onnx", feeds)
        run = model.time_run(feeds)
        for _ in range(3):
            run()
        tvm.cuda(0).sync()
        t0 = time.perf_counter()
        for _ in range(20):
            run()
        tvm.cuda(0).sync()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        for out_name in got:
            r = compare(out_name, got[out_name], ref[out_name])
            failed += not r.passed
            print(f"{name:<18} {out_name:<16} max_abs {r.max_abs_err:.2e} cosine {r.cosine:.8f} "
                  f"{'PASS' if r.passed else 'FAIL'}  ({ms:.3f} ms/run on GPU)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
