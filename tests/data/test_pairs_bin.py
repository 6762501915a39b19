"""Verification .bin: safe loading, validation, atomic writing, decoding."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from facecompat.data.pairs_bin import PairsBinError, decode_pairs, load_pairs_bin, write_pairs_bin
from tests.helpers import SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "verification"


def _jpeg(value: int, size: int = 112) -> bytes:
    img = np.full((size, size, 3), value, np.uint8)
    img[:, : size // 2, 0] = 255 - value
    return cv2.imencode(".jpg", img)[1].tobytes()


def _write_pickle(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def test_fixture_loads_and_decodes() -> None:
    expected = json.loads((FIXTURES / "tiny.json").read_text())
    images, issame = load_pairs_bin(FIXTURES / "tiny.bin")
    assert len(images) == 2 * expected["pairs"]
    assert issame.dtype == bool and issame.tolist() == expected["issame"]
    assert all(isinstance(image, bytes) for image in images)
    rgb = decode_pairs(images)
    assert rgb.shape == (6, 112, 112, 3) and rgb.dtype == np.uint8
    bgr = cv2.imdecode(np.frombuffer(images[3], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(rgb[3], bgr[..., ::-1])


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write_pickle(tmp_path / "evil.bin", ([_Exploit(marker), b"x"], [True]))
    with pytest.raises(PairsBinError, match=r"evil\.bin.*(posix|os)\.system"):
        load_pairs_bin(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the same file with the default loader does run it
    assert marker.exists()


def test_numpy_images_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "np.bin", ([np.zeros(3, np.uint8)] * 2, [True]))
    with pytest.raises(PairsBinError, match="numpy"):
        load_pairs_bin(path)


def test_codecs_encode_is_limited_to_latin1_text(tmp_path: Path) -> None:
    # _codecs.encode("eA==", "base64") would be a bytes->bytes trick; it is refused.
    payload = (b"\x80\x02c_codecs\nencode\nX\x04\x00\x00\x00eA==X\x06\x00\x00\x00base64\x86R"
               b"X\x01\x00\x00\x00a]\x88a\x86.")
    path = tmp_path / "codec.bin"
    path.write_bytes(payload)
    with pytest.raises(PairsBinError, match="latin1"):
        load_pairs_bin(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = (FIXTURES / "tiny.bin").read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PairsBinError, match=r"cut\.bin: not a readable pickle"):
        load_pairs_bin(path)
    path.write_bytes(b"")
    with pytest.raises(PairsBinError, match="not a readable pickle"):
        load_pairs_bin(path)


@pytest.mark.parametrize("obj, msg", [
    ({"images": []}, "top level is dict"),
    (([b"a", b"b"], [True], [1]), "3-element tuple"),
    ((b"ab", [True]), "must be lists"),
    (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
    (([b"a", "b"], [True]), "image 1 is str"),
    (([b"a", b"b", b"c", b"d"], [True, 1]), r"issame\[1\] is int"),
])
def test_wrong_structure(tmp_path: Path, obj: object, msg: str) -> None:
    path = _write_pickle(tmp_path / "bad.bin", obj)
    with pytest.raises(PairsBinError, match=msg):
        load_pairs_bin(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PairsBinError, match="cannot read"):
        load_pairs_bin(tmp_path / "nope.bin")


def test_python2_style_strings_load_as_bytes(tmp_path: Path) -> None:
    # Python 2 wrote str with SHORT_BINSTRING ('U'); protocol 2 bools are NEWTRUE/NEWFALSE.
    path = tmp_path / "py2.bin"
    path.write_bytes(b"\x80\x02]q\x00(U\x02abU\x02cde]q\x01\x89a\x86q\x02.")
    images, issame = load_pairs_bin(path)
    assert images == [b"ab", b"cd"] and issame.tolist() == [False]


def test_write_round_trip(tmp_path: Path) -> None:
    images = [_jpeg(v) for v in (10, 60, 110, 160)]
    issame = np.array([True, False])
    path = tmp_path / "sub" / "pairs.bin"
    write_pairs_bin(path, images, issame)
    assert path.read_bytes() == pickle.dumps((images, [True, False]), protocol=2)
    std_images, std_issame = pickle.loads(path.read_bytes())
    assert std_images == images and std_issame == [True, False]
    loaded, flags = load_pairs_bin(path)
    assert loaded == images and flags.tolist() == [True, False]
    assert [p.name for p in path.parent.iterdir()] == ["pairs.bin"]  # no temp file left
    with pytest.raises(ValueError, match="3 images"):
        write_pairs_bin(path, images[:3], [True])


def test_decode_errors_name_the_index() -> None:
    with pytest.raises(PairsBinError, match="image 1 .* does not decode"):
        decode_pairs([_jpeg(0), b"not an image"])
    with pytest.raises(PairsBinError, match="image 0 is 100x100"):
        decode_pairs([_jpeg(0, size=100)])
