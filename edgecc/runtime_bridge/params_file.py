"""`params.bin`: the weights of an artifact, in a format a 100-line C++ reader can load.

TVM's own parameter serialisation needs the full runtime's NDArray reader; firmware users and our
emulated runner want something trivially parseable and mmap-able instead. Layout (little-endian):

    magic      8 bytes   b"EDGECCP1"
    count      u64       number of tensors
    count x record:
        name_len  u32, name   utf-8 bytes
        dtype_len u32, dtype  ascii (numpy/TVM name: "float32", "int8", "uint8", "int32", ...)
        ndim      u32, shape  ndim x i64
        offset    u64        from the start of the file; a multiple of 64
        nbytes    u64
    data blobs, each at its offset (64-byte aligned, zero padding between)

Tensors are stored in the order the compiled entry function takes them (after the user inputs).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"EDGECCP1"
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(arr: np.ndarray) -> str:
    if arr.dtype == np.bool_:
        return "bool"
    return str(arr.dtype)


def encode_params(named: list[tuple[str, np.ndarray]]) -> bytes:
    """Serialise (name, array) pairs; the same inputs always give the same bytes."""
    # (np.ascontiguousarray would turn a 0-d scalar weight into shape (1,))
    arrays = [(name, np.require(arr, requirements="C")) for name, arr in named]
    header = bytearray(MAGIC + struct.pack("<Q", len(arrays)))
    records = []
    for name, arr in arrays:
        nb, db = name.encode("utf-8"), _dtype_name(arr).encode("ascii")
        rec = struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db
        rec += struct.pack("<I", arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
        records.append(rec)
    header_len = len(header) + sum(len(r) + 16 for r in records)
    offset = _align(header_len)
    offsets = []
    for _, arr in arrays:
        offsets.append(offset)
        offset = _align(offset + arr.nbytes)
    for rec, off, (_, arr) in zip(records, offsets, arrays):
        header += rec + struct.pack("<QQ", off, arr.nbytes)
    out = bytearray(offset)
    out[: len(header)] = header
    for off, (_, arr) in zip(offsets, arrays):
        out[off : off + arr.nbytes] = arr.tobytes()
    return bytes(out)


def write_params(path: str | Path, named: list[tuple[str, np.ndarray]]) -> int:
    data = encode_params(named)
    Path(path).write_bytes(data)
    return len(data)


def read_params(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Load every tensor (zero-copy views of one read-only buffer)."""
    buf = Path(path).read_bytes()
    if buf[:8] != MAGIC:
        raise ValueError(f"{path} is not an edgecc params file (bad magic)")
    (count,) = struct.unpack_from("<Q", buf, 8)
    pos, out = 16, []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", buf, pos)
        name = buf[pos + 4 : pos + 4 + n].decode("utf-8")
        pos += 4 + n
        (n,) = struct.unpack_from("<I", buf, pos)
        dtype = buf[pos + 4 : pos + 4 + n].decode("ascii")
        pos += 4 + n
        (ndim,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{ndim}q", buf, pos + 4)
        pos += 4 + 8 * ndim
        off, nbytes = struct.unpack_from("<QQ", buf, pos)
        pos += 16
        if off + nbytes > len(buf):
            raise ValueError(f"{path} is truncated (tensor '{name}' runs past the end of the file)")
        arr = np.frombuffer(buf, dtype=np.dtype(dtype), count=nbytes // max(1, np.dtype(dtype).itemsize),
                            offset=off).reshape(shape)
        out.append((name, arr))
    return out
