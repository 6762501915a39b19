"""Atomic writes (whole file or none, the usual mode) and the one error base."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import stat

import numpy as np
import pytest

import facecompat
from facecompat.errors import UserError
from facecompat.fileio import atomic_path, atomic_write, file_sha1


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_only_on_success_and_leaves_no_temp(tmp_path):
    path = tmp_path / "deep" / "out.txt"
    with atomic_write(path, "w", fsync=True) as f:
        f.write("first")
    assert path.read_text() == "first"
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(path) == 0o666 & ~mask  # not mkstemp's 0600
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert path.read_text() == "first" and sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    path = tmp_path / "features.npy"
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(3, 2))
        out[:] = 1.5
        out.flush()
        del out
        assert not path.exists()
    np.testing.assert_array_equal(np.load(path), np.full((3, 2), 1.5, np.float32))
    with pytest.raises(ValueError), atomic_path(tmp_path / "other.npy") as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]


def test_file_sha1(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    assert file_sha1(path, chunk_size=2) == "a9993e364706816aba3e25717850c26c9cd0d89d"


def test_every_project_error_is_a_user_error():
    """One base for the errors tools turn into one line (exit 2); each keeps its builtin base too."""
    errors = []
    for info in pkgutil.walk_packages(facecompat.__path__, "facecompat."):
        module = importlib.import_module(info.name)
        errors += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, Exception) and cls.__module__ == info.name]
    assert len(errors) >= 19
    not_user = [cls.__qualname__ for cls in errors if not issubclass(cls, UserError)
                and cls.__name__ not in ("StepSkipped", "CheckFailed")]  # the GPU check's own control flow
    assert not_user == []
    assert all(issubclass(cls, (ValueError, RuntimeError, OSError)) for cls in errors
               if issubclass(cls, UserError) and cls is not UserError)
