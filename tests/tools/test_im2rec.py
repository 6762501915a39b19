"""tools/im2rec.py as users run it: an aligned folder packed byte for byte, alignment by a landmark
file, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from facecompat.data.faces import FaceRecords
from tests.helpers.tools import run_tool, tool_help


def _write_folder(root: Path, sizes: dict[str, int], shape=(112, 112)) -> None:
    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
            cv2.imwrite(str(root / name / f"{i:03d}.jpg"), img)


def test_im2rec_packs_aligned_folder(tmp_path):
    _write_folder(tmp_path / "faces", {"bob": 2, "alice": 3})
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 5
    ds = FaceRecords(tmp_path / "rec")
    assert ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 0, 1, 1]  # alice before bob
    assert (tmp_path / "rec" / "identities.txt").read_text() == "0\talice\n1\tbob\n"
    # aligned JPEGs are stored byte for byte
    assert ds.reader.read(1).payload == (tmp_path / "faces" / "alice" / "000.jpg").read_bytes()


def test_im2rec_align_with_landmarks(tmp_path):
    from facecompat.data.align import ARCFACE_TEMPLATE

    _write_folder(tmp_path / "faces", {"a": 1, "b": 1}, shape=(200, 160))
    lines = [f"{n}/000.jpg " + " ".join(f"{v:.2f}" for v in (ARCFACE_TEMPLATE * 1.3 + 10).ravel()) + " 0.9"
             for n in "ab"]
    (tmp_path / "marks.txt").write_text("\n".join(lines) + "\n")
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"), "--align",
              str(tmp_path / "marks.txt"))
    assert out.returncode == 0, out.stderr
    assert FaceRecords(tmp_path / "rec").read_image(1).shape == (112, 112, 3)


def test_im2rec_rejects_unaligned_and_leaves_nothing(tmp_path):
    _write_folder(tmp_path / "faces", {"a": 1, "b": 1}, shape=(120, 100))
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"))
    assert out.returncode == 2
    assert "a/000.jpg: image is 100x120, expected 112x112" in out.stderr
    assert not (tmp_path / "rec" / "train.rec").exists()
    assert not any((tmp_path / "rec").glob("*.tmp"))
    out = run_tool("im2rec", str(tmp_path / "missing"), str(tmp_path / "rec"))
    assert out.returncode == 2 and "not a directory" in out.stderr


def test_im2rec_bad_arguments_fail_before_the_work(tmp_path):
    _write_folder(tmp_path / "faces", {"a": 1})
    (tmp_path / "file").write_text("x")
    for args, needle in (([str(tmp_path / "file")], "file is a file, expected a folder"),
                         ([str(tmp_path / "rec"), "--workers", "-1"], "--workers: must be >= 1"),
                         ([str(tmp_path / "rec"), "--quality", "101"], "--quality: must be 1..100"),
                         ([str(tmp_path / "rec"), "--align", str(tmp_path / "nope.txt")], "--align: ")):
        out = run_tool("im2rec", str(tmp_path / "faces"), *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith("im2rec.py: error: ") and needle in lines[0], lines
    assert not (tmp_path / "rec").exists()


def test_im2rec_bad_landmark_file(tmp_path):
    _write_folder(tmp_path / "faces", {"a": 1, "b": 1}, shape=(150, 150))
    marks = tmp_path / "marks.txt"
    marks.write_text("a/000.jpg 1 2 3\n")
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"), "--align", str(marks))
    assert out.returncode == 2 and f"{marks}: line 1: expected 'image x1 y1 ... x5 y5 [score]'" in out.stderr
    from facecompat.data.align import ARCFACE_TEMPLATE

    good = " ".join(f"{v:.2f}" for v in (ARCFACE_TEMPLATE + 10).ravel())
    marks.write_text(f"a/000.jpg {good}\n")  # nothing for b/000.jpg
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"), "--align", str(marks))
    assert out.returncode == 2 and "b/000.jpg: no landmarks for 'b/000.jpg'" in out.stderr
    marks.write_text(f"a/000.jpg {good}\nb/000.jpg " + " ".join(["50"] * 10) + "\n")  # all points equal
    out = run_tool("im2rec", str(tmp_path / "faces"), str(tmp_path / "rec"), "--align", str(marks))
    assert out.returncode == 2 and "b/000.jpg: cannot align with its landmarks" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rec" / "train.rec").exists()


def test_help_names_the_main_arguments(capsys):
    text = tool_help("im2rec", capsys)
    for arg in ("root", "out", "--align"):
        assert arg in text, arg
