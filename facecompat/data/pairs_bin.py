"""Verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` is a pickle (protocol 2) of ``(images, issame)``: ``images`` a list of encoded
image bytes (JPEG/PNG, 112x112), ``issame`` a list of bools; images ``2i`` and ``2i + 1``
form pair ``i``.

Such files come from strangers, and unpickling runs code, so they are read with an
unpickler that resolves no global: only the opcodes that build bytes, str, lists, tuples,
bools and None can succeed. One global is let through, in a restricted form: Python 3
pickles ``bytes`` at protocol 2 as ``_codecs.encode(text, "latin1")`` (Python 2 files use
plain string opcodes instead), so ``_codecs.encode`` resolves to a function that accepts
exactly a str and the latin-1 codec and returns its bytes. Anything else requested
(``numpy`` arrays, ``os.system``, ...) raises :class:`PairsBinError` before it runs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from facecompat.errors import UserError
from facecompat.fileio import atomic_write

IMAGE_SIZE = 112


class PairsBinError(UserError, ValueError):
    """A verification .bin that cannot be (safely) read, or an image in it that is unusable."""


class _PairsUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global except a latin-1-only ``_codecs.encode``."""

    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes
        self.path = path

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle API)
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        hint = " (images stored as numpy arrays: re-save them as encoded bytes)" if module.startswith(
            "numpy") else ""
        raise PairsBinError(f"{self.path}: pickle requests global {module}.{name}; a verification .bin "
                            f"may hold only bytes, lists, tuples and bools{hint}")

    def persistent_load(self, pid):  # noqa: D102 (pickle API)
        raise PairsBinError(f"{self.path}: pickle holds a persistent id; not a verification .bin")

    def _latin1_encode(self, text: object, encoding: object = None) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise PairsBinError(f"{self.path}: pickle calls _codecs.encode with {type(text).__name__} and "
                                f"codec {encoding!r}; only (str, 'latin1') is how bytes are pickled")
        return text.encode("latin-1")


def load_pairs_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read a verification .bin without executing anything it contains.

    Args:
        path: the ``.bin`` file.

    Returns:
        ``(images, issame)``: ``2N`` encoded images and an ``[N]`` bool array.

    Raises:
        PairsBinError: unreadable or truncated pickle, a global requested, or a structure
            other than ``(list of 2N bytes, list of N bools)``; the message names the file.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            obj = _PairsUnpickler(f, path).load()
    except PairsBinError:
        raise
    except OSError as e:
        raise PairsBinError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # any unpickling failure: truncated, garbage, unknown opcode
        raise PairsBinError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    return _validate(obj, path)


def _validate(obj: object, path: str) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        what = f"a {len(obj)}-element {type(obj).__name__}" if isinstance(obj, (tuple, list)) else type(
            obj).__name__
        raise PairsBinError(f"{path}: top level is {what}; expected (images, issame)")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise PairsBinError(f"{path}: images and issame must be lists, got {type(images).__name__} "
                            f"and {type(issame).__name__}")
    if len(images) != 2 * len(issame):
        raise PairsBinError(f"{path}: {len(images)} images for {len(issame)} pairs; expected "
                            f"{2 * len(issame)} (two per pair)")
    for i, image in enumerate(images):
        if not isinstance(image, bytes):
            raise PairsBinError(f"{path}: image {i} is {type(image).__name__}, not encoded bytes")
    for i, flag in enumerate(issame):
        if not isinstance(flag, bool):
            raise PairsBinError(f"{path}: issame[{i}] is {type(flag).__name__} {flag!r}, not a bool")
    return list(images), np.array(issame, dtype=bool)


def write_pairs_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(images, issame)`` as a protocol-2 pickle, atomically (temp file + rename).

    Args:
        path: destination ``.bin``.
        images: ``2N`` encoded images; ``images[2i]`` and ``images[2i + 1]`` form pair ``i``.
        issame: ``N`` flags (bools, or a bool array).
    """
    path = Path(path)
    images = [bytes(image) for image in images]
    flags = [bool(flag) for flag in np.asarray(issame, dtype=bool).ravel()]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs; expected {2 * len(flags)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        pickle.dump((images, flags), f, protocol=2)


def decode_pairs(images: Sequence[bytes]) -> np.ndarray:
    """Decode the images of a verification set.

    Args:
        images: encoded 112x112 images.

    Returns:
        [len(images), 112, 112, 3] uint8, RGB.

    Raises:
        PairsBinError: an image does not decode or is not 112x112 (the message gives its index).
    """
    out = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PairsBinError(f"image {i} ({len(data)} bytes) does not decode")
        if bgr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise PairsBinError(f"image {i} is {bgr.shape[1]}x{bgr.shape[0]}, expected "
                                f"{IMAGE_SIZE}x{IMAGE_SIZE} (aligned faces)")
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out[i])
    return out
