"""The artifact on disk: its file names, the manifest, and writing it atomically.

    out/
      manifest.json   signature, target, compression, memory plan, versions, file hashes
      model.so        the compiled library (Relax VM executable + kernels) for the target's architecture
      params.bin      weights (see params_file.py)

Writers fill a temporary sibling directory and rename it into place at the end, so an interrupted or
failed build never leaves a half-written artifact where the user asked for one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgecc.errors import EdgeccError

MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.bin"
FORMAT = "edgecc-artifact/1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(out_dir: Path, force: bool) -> None:
    """An existing output is only replaced when asked to; checked before any work starts."""
    if out_dir.exists() and not force:
        raise EdgeccError(f"output directory '{out_dir}' already exists", "pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeccError(f"output path '{out_dir}' exists and is not a directory", "choose another -o path")


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success it replaces `out_dir`, on failure it vanishes."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> None:
    """Deterministic JSON (sorted keys, fixed separators) so identical builds give identical bytes."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(artifact_dir: str | Path) -> dict:
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise EdgeccError(f"artifact directory '{artifact_dir}' does not exist",
                          "pass the -o directory of `edgecc build`")
    if not path.is_file():
        raise EdgeccError(f"'{artifact_dir}' has no {MANIFEST}; it is not an edgecc artifact",
                          "pass the -o directory of `edgecc build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeccError(f"{path} is not valid JSON ({exc})", "rebuild the artifact") from exc
    if manifest.get("format") != FORMAT:
        raise EdgeccError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}",
                          "rebuild the artifact with this edgecc version")
    return manifest


def load_library(artifact_dir: str | Path):
    """Load the artifact's compiled library into this process, as the file now on disk.

    dlopen hands back a library already loaded from the same path, whatever the file there is now: a model
    rebuilt into the same directory and loaded again in one process (a notebook, a test run reusing a temp
    dir) would run the FIRST library's code with the new weights. Loading through a link at a path never
    used before makes dlopen compare the file itself (device and inode): the same file is shared, a rebuilt
    one is loaded anew. The link is removed once loaded; the library stays mapped. (`tvm.runtime.load_module`
    would resolve the link back to the artifact's path, so tvm_ffi's loader is called directly.)
    """
    import tvm  # noqa: F401 - registers TVM's library loader with tvm_ffi
    import tvm_ffi

    library = (Path(artifact_dir) / LIBRARY).resolve()
    link_dir = Path(tempfile.mkdtemp(prefix="edgecc-lib-"))
    try:
        link = link_dir / LIBRARY
        os.symlink(library, link)
        return tvm_ffi.load_module(str(link))
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)


def verify_file_hashes(artifact_dir: Path, manifest: dict) -> None:
    """Detect a corrupted or swapped library/params file before loading it."""
    for name, info in manifest.get("files", {}).items():
        path = artifact_dir / name
        if not path.is_file():
            raise EdgeccError(f"artifact file '{path}' is missing", "rebuild the artifact")
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise EdgeccError(f"artifact file '{path}' does not match the manifest hash (corrupted or replaced)",
                              "rebuild the artifact")
