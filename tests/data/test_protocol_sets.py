"""facecompat.data.protocol_sets: a face folder and a verification .bin as IJB-C-style folders that the
IJB evaluation reads unchanged; determinism, the split rules, reuse, atomicity and the one-line errors."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from facecompat.data import protocol_sets
from facecompat.data.align import ARCFACE_TEMPLATE, align_face
from facecompat.data.pairs_bin import write_pairs_bin
from facecompat.data.protocol_sets import (
    ProtocolError,
    SplitParams,
    make_bin_protocol,
    make_face_folder_protocol,
)
from facecompat.eval.extract import read_face_list
from facecompat.eval.ijb import load_ijb_meta
from tests.helpers.data import FACE_FOLDER_SIZES as SIZES
from tests.helpers.data import write_faces
from tests.helpers.errors import raises_one_line

SMALL = SplitParams(impostors_per_genuine=3, min_impostors=40, probe_templates=4)  # impostors sampled


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    return write_faces(tmp_path_factory.mktemp("protocol_faces") / "faces")


@pytest.fixture(scope="module")
def built(faces, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("protocol_out") / "set"
    return out, make_face_folder_protocol(faces, out, params=SMALL, seed=5)


def _meta_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "meta").iterdir())}


def test_two_calls_write_identical_folders(faces, built, tmp_path):
    out, record = built
    again = make_face_folder_protocol(faces, tmp_path / "again", params=SMALL, seed=5)
    assert _meta_bytes(out) == _meta_bytes(tmp_path / "again")
    assert sorted(p.name for p in (out / "loose_crop").iterdir()) == sorted(
        p.name for p in (tmp_path / "again" / "loose_crop").iterdir())
    assert (out / "protocol.json").read_bytes() == (tmp_path / "again" / "protocol.json").read_bytes()
    assert again["counts"] == record["counts"] and not again["reused"]
    make_face_folder_protocol(faces, tmp_path / "other", params=SMALL, seed=6)
    assert _meta_bytes(tmp_path / "other") != _meta_bytes(out)
    make_face_folder_protocol(faces, tmp_path / "knobs", seed=5, **asdict(SMALL))  # knobs by keyword
    assert _meta_bytes(tmp_path / "knobs") == _meta_bytes(out)


def test_split_rules_and_counts(faces, built):
    out, record = built
    counts, meta = record["counts"], load_ijb_meta(out, "IJBC")
    subject = {int(t): int(s) for g in (meta.probes, *meta.galleries.values())
               for t, s in zip(g.template_ids, g.subject_ids)}
    g1, g2 = (set(meta.galleries[g].subject_ids.tolist()) for g in ("G1", "G2"))
    size = {s: SIZES[(s - 1) % len(SIZES)] for s in range(1, 22)}  # subject s is folder id<s - 1>
    multi = [s for s, n in size.items() if n >= 2]
    assert counts["identities"] == 21 and counts["empty_folders_skipped"] == 1
    assert record["skipped"] == {"empty_folders": ["nobody"],
                                 "single_image_identities": ["id00", "id07", "id14"]}
    assert not g1 & g2 and len(g1) + len(g2) == round(0.8 * len(multi)) == counts["gallery_templates"]
    assert abs(len(g1) - len(g2)) <= 1
    assert (counts["enrolled_G1"], counts["enrolled_G2"]) == (len(g1), len(g2))
    for k in (0, 7, 14):  # one-image identities: one probe template, in neither gallery
        assert k + 1 not in g1 | g2 and list(subject.values()).count(k + 1) == 1
    gallery = {t for g in meta.galleries.values() for t in g.template_ids.tolist()}
    faces_of = np.bincount(meta.template_ids)
    for t in gallery:  # min(gallery_images, n // 2) images
        assert faces_of[t] == min(3, size[subject[t]] // 2)
    for s in range(1, 22):  # probe templates: one image each, at most 4 per identity
        probes = [t for t in meta.probes.template_ids.tolist() if subject[t] == s]
        assert 1 <= len(probes) <= 4 and all(faces_of[t] == 1 for t in probes)
    labels = meta.pair_labels.astype(bool)
    s1 = np.array([subject[t] for t in meta.pair_t1.tolist()])
    s2 = np.array([subject[t] for t in meta.pair_t2.tolist()])
    assert (s1[labels] == s2[labels]).all() and (s1[~labels] != s2[~labels]).all()
    assert set(meta.pair_t1.tolist()) <= gallery and not set(meta.pair_t2.tolist()) & gallery
    assert len({(a, b) for a, b in zip(meta.pair_t1.tolist(), meta.pair_t2.tolist())}) == len(labels)
    mated = [t for t in meta.probes.template_ids.tolist() if subject[t] in g1 | g2]
    assert sorted(meta.pair_t2[labels].tolist()) == sorted(mated) and labels.sum() == counts["genuine_pairs"]
    assert counts["impostor_pairs"] == min(counts["possible_impostor_pairs"],
                                           max(40, 3 * counts["genuine_pairs"])) == (~labels).sum()
    assert counts["impostor_pairs"] < counts["possible_impostor_pairs"]  # the sampled branch
    assert counts["mated_probes_G1"] + counts["mated_probes_G2"] == len(mated)
    assert counts["faces"] + counts["unused_images"] == sum(size.values()) == record["num_files"]
    in_gallery = {s: min(3, n // 2) if s in g1 | g2 else 0 for s, n in size.items()}
    assert counts["unused_images"] == sum(max(0, n - in_gallery[s] - 4) for s, n in size.items())
    assert (out / "identities.txt").read_text().splitlines()[:2] == ["1\tid00", "2\tid01"]


def test_faces_load_and_align_back(faces, built):
    out, _ = built
    face_list = read_face_list(out, "IJBC")
    meta = load_ijb_meta(out, "IJBC")
    assert face_list.names == meta.image_names.tolist() and (face_list.scores == 1.0).all()
    sources = dict(line.split("\t") for line in (out / "faces.txt").read_text().splitlines())
    for name, points in list(zip(face_list.names, face_list.landmarks))[:10]:
        np.testing.assert_allclose(points, ARCFACE_TEMPLATE, atol=1e-4)
        image = cv2.imread(str(out / "loose_crop" / name))
        assert (image == cv2.imread(str(faces / sources[name]))).all()  # a link or copy of the source
        aligned = align_face(image, points)
        assert np.abs(aligned.astype(int) - image).max() <= 1


def test_loose_crops_with_a_landmark_file(tmp_path):
    root = write_faces(tmp_path / "faces", num_ids=7, shape=(150, 130))
    rels = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    marks = ARCFACE_TEMPLATE * 1.2 + 7
    lines = [f"{rel} " + " ".join(f"{v:.3f}" for v in marks.ravel()) + " 0.5" for rel in rels]
    (tmp_path / "marks.txt").write_text("\n".join(lines) + "\n")
    record = make_face_folder_protocol(root, tmp_path / "out", landmarks=tmp_path / "marks.txt", params=SMALL)
    face_list = read_face_list(tmp_path / "out", "IJBC")
    assert face_list.landmarks.shape == (record["counts"]["faces"], 5, 2)
    np.testing.assert_allclose(face_list.landmarks - marks, 0, atol=1e-3)
    assert (face_list.scores == 1.0).all()  # the landmark file's score is not used
    (tmp_path / "marks.txt").write_text("\n".join(lines[1:]) + "\n")
    raises_one_line(ProtocolError, f"no landmarks for '{rels[0]}'", make_face_folder_protocol, root,
                    tmp_path / "out2", landmarks=tmp_path / "marks.txt")


def test_second_call_reuses_or_rewrites_identically(faces, tmp_path):
    out = tmp_path / "set"
    make_face_folder_protocol(faces, out, params=SMALL)
    first, pairs = _meta_bytes(out), out / "meta" / "ijbc_template_pair_label.txt"
    stamp = pairs.stat().st_mtime_ns
    assert make_face_folder_protocol(faces, out, params=SMALL)["reused"]
    assert pairs.stat().st_mtime_ns == stamp
    pairs.write_text("1 2 1\n")  # damaged since: the same inputs rewrite it
    assert not make_face_folder_protocol(faces, out, params=SMALL)["reused"]
    assert _meta_bytes(out) == first
    raises_one_line(ProtocolError, r"other inputs \(seed differ\).*--force", make_face_folder_protocol,
                    faces, out, params=SMALL, seed=1)
    assert not make_face_folder_protocol(faces, out, params=SMALL, seed=1, overwrite=True)["reused"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left


def test_failed_build_leaves_nothing(faces, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(protocol_sets, "_place", fail)
    with pytest.raises(OSError, match="disk full"):
        make_face_folder_protocol(faces, tmp_path / "set", params=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_bin_protocol(tmp_path):
    rng = np.random.default_rng(1)
    jpegs = [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), np.uint8))[1].tobytes()
             for _ in range(5)]
    order = [0, 1, 0, 2, 3, 4, 1, 3]  # image 0 and 1 stored twice, as a .bin stores a reused image
    write_pairs_bin(tmp_path / "v.bin", [jpegs[i] for i in order], [True, False, False, True])
    record = make_bin_protocol(tmp_path / "v.bin", tmp_path / "out")
    meta = load_ijb_meta(tmp_path / "out", "IJBC")
    assert not meta.has_1n and "no identities" in record["1:N"]
    assert record["counts"] == {"images": 8, "templates": 5, "faces": 5, "pairs": 4, "genuine_pairs": 2,
                                "impostor_pairs": 2}
    assert np.c_[meta.pair_t1, meta.pair_t2, meta.pair_labels].tolist() == [[1, 2, 1], [1, 3, 0], [4, 5, 0],
                                                                            [2, 4, 1]]
    assert read_face_list(tmp_path / "out", "IJBC").names == meta.image_names.tolist()
    assert make_bin_protocol(tmp_path / "v.bin", tmp_path / "out")["reused"]


def _garbage_image(root: Path) -> Path:
    (root / "id01" / "9.jpg").write_bytes(b"not a jpeg")
    return root / "id01" / "9.jpg"


@pytest.mark.parametrize("case", ["empty root", "no root", "unreadable image", "not square",
                                  "one identity", "out holds files", "out inside root", "bad knob",
                                  "bad bin", "bin one label"])
def test_errors_are_one_line(case, tmp_path):
    root = write_faces(tmp_path / "faces", num_ids=3)
    out, call, match = tmp_path / "out", make_face_folder_protocol, None
    args: tuple = (root, out)
    kw: dict = {}
    if case == "empty root":
        root = tmp_path / "empty"
        root.mkdir()
        args, match = (root, out), f"{root}: no <identity>/<image> files found"
    elif case == "no root":
        args, match = (tmp_path / "nothing", out), "nothing: not a directory"
    elif case == "unreadable image":
        match = f"{_garbage_image(root)}: not a decodable image"
    elif case == "not square":
        cv2.imwrite(str(root / "id02" / "9.jpg"), np.zeros((112, 100, 3), np.uint8))
        match = "9.jpg: image is 100x112; aligned faces are square"
    elif case == "one identity":
        args, match = (write_faces(tmp_path / "two", num_ids=2), out), "1 identities with 2 or more images"
    elif case == "out holds files":
        out.mkdir()
        (out / "mine.txt").write_text("x")
        match = f"{out}: holds files but no protocol.json"
    elif case == "out inside root":
        args, match = (root, root / "set"), "inside the face folder"
    elif case == "bad knob":
        call, args, match = SplitParams, (), "gallery_share: expected a share in \\(0, 1\\], got 1.5"
        kw = {"gallery_share": 1.5}
    elif case == "bad bin":
        (tmp_path / "x.bin").write_bytes(b"garbage")
        call, args, match = make_bin_protocol, (tmp_path / "x.bin", out), "x.bin: not a readable pickle"
    else:
        write_pairs_bin(tmp_path / "y.bin", [b"a", b"b"], [True])
        call, args, match = make_bin_protocol, (tmp_path / "y.bin", out), "1 genuine and 0 impostor"
    raises_one_line(ProtocolError, match, call, *args, **kw)
    assert case == "out holds files" or not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
