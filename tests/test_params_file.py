"""params.bin round trip: every dtype and rank (0-d scalars included) comes back bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from edgecc.runtime_bridge.params_file import ALIGN, encode_params, read_params, write_params


def _sample():
    rng = np.random.default_rng(0)
    return [
        ("scalar_i64", np.array(256, dtype=np.int64)),
        ("w", rng.standard_normal((3, 5)).astype(np.float32)),
        ("transposed", np.asfortranarray(rng.standard_normal((4, 7)).astype(np.float32))),
        ("packed", rng.integers(0, 255, size=(9,), dtype=np.uint8)),
        ("half", rng.standard_normal((2, 2, 2)).astype(np.float16)),
        ("mask", np.array([True, False, True])),
        ("empty", np.zeros((0, 4), dtype=np.float32)),
    ]


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "params.bin"
    write_params(path, _sample())
    back = read_params(path)
    assert [n for n, _ in back] == [n for n, _ in _sample()]
    for (_, want), (_, got) in zip(_sample(), back):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)


def test_blobs_are_aligned_and_bytes_deterministic():
    data = encode_params(_sample())
    assert data == encode_params(_sample())
    assert len(data) % ALIGN == 0


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "params.bin"
    data = encode_params([("w", np.ones((64, 64), dtype=np.float32))])
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_params(path)


def test_bad_magic_is_detected(tmp_path):
    path = tmp_path / "params.bin"
    path.write_bytes(b"NOTPARAM" + bytes(64))
    with pytest.raises(ValueError, match="magic"):
        read_params(path)
