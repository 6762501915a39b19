"""Synthetic identities and the data sets written from them (rec, IJB-C folder, lfw.bin)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facecompat.data.align import ARCFACE_TEMPLATE, align_face
from facecompat.data.pairs_bin import decode_pairs, load_pairs_bin
from facecompat.data.recordio import RecordReader
from facecompat.data.synthetic.identity import Conditions, Identity, rng_for
from facecompat.data.synthetic.ijbc import CSV_HEADER, plan_ijbc
from facecompat.data.synthetic.render import render_face
from facecompat.data.synthetic.sets import (
    DOMAINS,
    SyntheticError,
    SyntheticSpec,
    generate_synthetic,
    write_lfw_bin,
)
from tests.helpers.data import SMALL_SYNTHETIC as SPEC


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same spec rendered twice: in this process, and by two worker processes."""
    one = tmp_path_factory.mktemp("synth1")
    two = tmp_path_factory.mktemp("synth2")
    assert generate_synthetic(one, SPEC, workers=1, progress=False)[1]
    assert generate_synthetic(two, SPEC, workers=2, progress=False)[1]
    return one, two


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_is_deterministic_and_independent_of_workers(outputs: tuple[Path, Path]) -> None:
    one, two = _files(outputs[0]), _files(outputs[1])
    assert {"train/train.rec", "train/train.idx", "train/property", "lfw.bin", "manifest.json",
            "IJBC/meta/ijbc_face_tid_mid.txt"} <= set(one)
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


def test_render_is_deterministic() -> None:
    ident = Identity.sample(rng_for(1, 2, 3))
    cond = Conditions.sample(rng_for(4, 5), canvas=200, eye_px=45)
    (a, la), (b, lb) = render_face(ident, cond), render_face(ident, cond)
    assert a.shape == (200, 200, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert Identity.sample(rng_for(1, 2, 3)) == ident


def test_rec_reads_back(outputs: tuple[Path, Path]) -> None:
    manifest = json.loads((outputs[0] / "manifest.json").read_text())
    num_images, num_classes = manifest["counts"]["train"]["images"], manifest["counts"]["train"]["classes"]
    assert num_classes == SPEC.num_ids and 2 * SPEC.num_ids <= num_images <= 4 * SPEC.num_ids
    reader = RecordReader(outputs[0] / "train" / "train.rec", outputs[0] / "train" / "train.idx")
    assert len(reader) == 1 + num_images + num_classes
    head = reader.read(0)
    assert head.flag == 2 and head.label.tolist() == [num_images + 1, num_images + 1 + num_classes]
    labels = []
    for key in range(1, num_images + 1):
        record = reader.read(key)
        img = cv2.imdecode(np.frombuffer(record.payload, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (112, 112, 3)
        labels.append(int(record.label))
    assert labels == sorted(labels) and set(labels) == set(range(num_classes))
    assert (outputs[0] / "train" / "property").read_text().strip() == f"{num_classes},112,112"


def _frontal(ident_key: tuple[int, ...], canvas: int = 200) -> tuple[Identity, Conditions]:
    cond = Conditions.sample(rng_for(*ident_key, 9), canvas=canvas, eye_px=45)
    clean = dataclasses.replace(cond, eye_close=0.0, gaze=(0.0, 0.0), occluder=0, glasses_on=False, blur=0.0,
                                noise=0.0, jpeg=0, light=0.0, mouth_open=0.0)
    return Identity.sample(rng_for(*ident_key)), clean


def _gray_at(img: np.ndarray, xy: np.ndarray) -> float:
    x, y = (int(round(v)) for v in xy)
    return float(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[y - 1:y + 2, x - 1:x + 2].mean())


def test_landmarks_land_on_the_features() -> None:
    darker_eyes = darker_mouth = 0
    for k in range(24):
        ident, cond = _frontal((11, k))
        img, lmk = render_face(ident, cond)
        iod = float(np.linalg.norm(lmk[1] - lmk[0]))
        assert lmk[0, 0] < lmk[1, 0] and lmk[3, 0] < lmk[4, 0]  # image-left first
        assert lmk[0, 1] < lmk[2, 1] < lmk[3, 1]  # eyes above nose above mouth
        cheek = (lmk[0] + lmk[3]) / 2 - (0.15 * iod, 0)
        darker_eyes += _gray_at(img, lmk[0]) < _gray_at(img, cheek) and _gray_at(img, lmk[1]) < _gray_at(
            img, cheek + (lmk[1] - lmk[0]))
        darker_mouth += _gray_at(img, (lmk[3] + lmk[4]) / 2) < _gray_at(img, cheek)
    assert darker_eyes >= 21 and darker_mouth >= 20


def test_alignment_puts_features_on_the_template() -> None:
    """Over varied poses, aligned crops are dark at the template's pupils, light just below."""
    eye, below = [], []
    for k in range(40):
        ident = Identity.sample(rng_for(12, k))
        cond = dataclasses.replace(Conditions.sample(rng_for(12, k, 1), canvas=160, eye_px=34), eye_close=0.0,
                                   occluder=0, glasses_on=False, gaze=(0.0, 0.0))
        aligned = align_face(*render_face(ident, cond))
        left, right = ARCFACE_TEMPLATE[0], ARCFACE_TEMPLATE[1]
        eye.append(_gray_at(aligned, left) + _gray_at(aligned, right))
        below.append(_gray_at(aligned, left + (0, 12)) + _gray_at(aligned, right + (0, 12)))
    assert np.mean(np.array(eye) < np.array(below)) > 0.85


def _read_ijbc(root: Path) -> dict:
    meta = root / "IJBC" / "meta"
    faces = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    lines = (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()
    pts = {p[0]: p[1:] for p in (line.split() for line in lines)}
    pairs = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=np.int64, ndmin=2)
    tables = {}
    for name in ("G1", "G2", "probe"):
        path = meta / (f"ijbc_1N_gallery_{name}.csv" if name != "probe" else "ijbc_1N_probe_mixed.csv")
        assert path.read_text().splitlines()[0] == CSV_HEADER
        tables[name] = list(csv.DictReader(path.open()))
    return {"faces": faces, "pts": pts, "pairs": pairs, "tables": tables}


def test_ijbc_meta_is_consistent(outputs: tuple[Path, Path]) -> None:
    root = outputs[0]
    d = _read_ijbc(root)
    names = [f[0] for f in d["faces"]]
    assert names == [f"{i + 1}.jpg" for i in range(len(names))]
    assert set(d["pts"]) == set(names)
    for name in names:
        assert (root / "IJBC" / "loose_crop" / name).is_file()
        values = [float(v) for v in d["pts"][name]]
        assert len(values) == 11 and 0.3 <= values[-1] <= 1.0
    img = cv2.imread(str(root / "IJBC" / "loose_crop" / names[0]))
    assert img is not None and 160 <= img.shape[0] <= 250
    template_of = {}
    for _, tid, mid in d["faces"]:
        template_of.setdefault(int(tid), set()).add(int(mid))
    subject_of, source = {}, {}
    for table, rows in d["tables"].items():
        for row in rows:
            tid = int(row["TEMPLATE_ID"])
            assert source.setdefault(tid, table) == table  # a template lives in one file
            assert subject_of.setdefault(tid, int(row["SUBJECT_ID"])) == int(row["SUBJECT_ID"])
    assert sum(len(rows) for rows in d["tables"].values()) == len(names)  # one row per face
    assert set(subject_of) == set(template_of)
    g1 = {subject_of[t] for t, s in source.items() if s == "G1"}
    g2 = {subject_of[t] for t, s in source.items() if s == "G2"}
    probe_subjects = {subject_of[t] for t, s in source.items() if s == "probe"}
    assert g1 and g2 and not g1 & g2
    assert g1 | g2 <= probe_subjects and probe_subjects - g1 - g2  # mated and non-mated probes
    enrolled = {t for t, s in source.items() if s in ("G1", "G2")}
    probes = {t for t, s in source.items() if s == "probe"}
    for t1, t2, label in d["pairs"].tolist():  # IJB-C: enrolled template first, probe second
        assert t1 in enrolled and t2 in probes, (t1, t2)
        assert (subject_of[t1] == subject_of[t2]) == bool(label)
    genuine = {(a, b) for a, b in itertools.product(sorted(enrolled), sorted(probes))
               if subject_of[a] == subject_of[b]}
    assert {(a, b) for a, b, lab in d["pairs"].tolist() if lab} == genuine
    assert len(d["pairs"]) == len({(a, b) for a, b, _ in d["pairs"].tolist()})
    num_genuine = len(genuine)
    assert len(d["pairs"]) - num_genuine == min(SPEC.impostors_per_genuine * num_genuine,
                                                len(enrolled) * len(probes) - num_genuine)
    media_frames = {}
    for _, _, mid in d["faces"]:
        media_frames[mid] = media_frames.get(mid, 0) + 1
    assert max(media_frames.values()) > 1  # some media are videos


@pytest.mark.parametrize("subjects, impostors_per_genuine", [(3, 30), (12, 30), (12, 2), (41, 5)])
def test_ijbc_pairs_put_the_enrolled_template_first_and_a_probe_second(subjects: int,
                                                                         impostors_per_genuine: int) -> None:
    spec = dataclasses.replace(SPEC, ijbc_subjects=subjects, impostors_per_genuine=impostors_per_genuine)
    plan = plan_ijbc(spec)
    enrolled = {t for tids in plan.galleries.values() for t in tids}
    probes = set(plan.probes)
    t1, t2, label = plan.pairs.T
    assert set(t1.tolist()) <= enrolled and set(t2.tolist()) <= probes
    subject = plan.template_subject
    assert [subject[a] == subject[b] for a, b in zip(t1.tolist(), t2.tolist())] == label.astype(bool).tolist()
    assert 0 < label.sum() < len(label)  # genuine and impostor pairs
    # every probe of an enrolled subject meets that subject's gallery template
    gallery_of = {subject[t]: t for t in enrolled}
    want = {(gallery_of[subject[p]], p) for p in probes if subject[p] in gallery_of}
    assert {(a, b) for a, b, lab in plan.pairs.tolist() if lab} == want
    num_impostor_cells = len(enrolled) * len(probes) - len(want)
    assert len(label) - len(want) == min(impostors_per_genuine * len(want), num_impostor_cells)
    assert len({(a, b) for a, b, _ in plan.pairs.tolist()}) == len(label)


def test_test_identities_are_not_training_identities() -> None:
    assert len(set(DOMAINS.values())) == len(DOMAINS)
    train = {Identity.sample(rng_for(SPEC.seed, DOMAINS["train"], k, 0)) for k in range(SPEC.num_ids)}
    ijbc = {Identity.sample(rng_for(SPEC.seed, DOMAINS["ijbc"], k, 0))
            for k in range(1, SPEC.ijbc_subjects + 1)}
    lfw = {Identity.sample(rng_for(SPEC.seed, DOMAINS["lfw"], k, 0)) for k in range(2 * SPEC.lfw_pairs)}
    assert not train & ijbc and not train & lfw


def test_lfw_bin(outputs: tuple[Path, Path]) -> None:
    images, issame = load_pairs_bin(outputs[0] / "lfw.bin")
    assert len(images) == 2 * SPEC.lfw_pairs
    assert issame.tolist() == [i % 2 == 0 for i in range(SPEC.lfw_pairs)]
    assert decode_pairs(images).shape == (2 * SPEC.lfw_pairs, 112, 112, 3)


def test_pixel_nearest_neighbour_is_above_chance_but_far_from_perfect(tmp_path: Path) -> None:
    """Difficulty band: raw pixels verify some pairs, not most (a CNN has something to learn)."""
    spec = dataclasses.replace(SPEC, lfw_pairs=200)
    write_lfw_bin(tmp_path / "lfw.bin", spec, workers=1, progress=False)
    images, issame = load_pairs_bin(tmp_path / "lfw.bin")
    gray = [cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (28, 28), interpolation=cv2.INTER_AREA)
            for img in decode_pairs(images)]
    feats = np.stack(gray).reshape(len(gray), -1).astype(np.float64)
    feats -= feats.mean(axis=1, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sims = (feats[0::2] * feats[1::2]).sum(axis=1)
    accuracy = max(((sims >= t) == issame).mean() for t in sims)
    assert 0.55 <= accuracy <= 0.97, accuracy


def test_rerun_is_idempotent_and_guards_foreign_state(outputs: tuple[Path, Path], tmp_path: Path) -> None:
    root = outputs[0]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    manifest, generated = generate_synthetic(root, SPEC, workers=1, progress=False)
    assert not generated and manifest["spec"] == SPEC.to_dict()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(SyntheticError, match="another spec.*num_ids 5 there, 6 asked"):
        generate_synthetic(root, dataclasses.replace(SPEC, num_ids=6), workers=1, progress=False)
    (tmp_path / "train").mkdir()
    with pytest.raises(SyntheticError, match="train exist.*without manifest"):
        generate_synthetic(tmp_path, SPEC, workers=1, progress=False)
    small = dataclasses.replace(SPEC, num_ids=2, ijbc_subjects=3, lfw_pairs=2)
    manifest, generated = generate_synthetic(tmp_path, small, workers=1, force=True, progress=False)
    assert generated and manifest["counts"]["train"]["classes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IJBC", "lfw.bin", "manifest.json", "train"]


def test_nuisance_scales_the_captures_and_keeps_default_manifests(tmp_path: Path) -> None:
    assert "nuisance" not in SPEC.to_dict()  # folders made before the knob still match their spec
    easy = dataclasses.replace(SPEC, lfw_pairs=40, nuisance=0.3)
    assert easy.to_dict()["nuisance"] == 0.3
    sims = {}
    for name, spec in (("default", dataclasses.replace(SPEC, lfw_pairs=40)), ("easy", easy)):
        write_lfw_bin(tmp_path / f"{name}.bin", spec, workers=1, progress=False)
        images, issame = load_pairs_bin(tmp_path / f"{name}.bin")
        faces = decode_pairs(images).astype(np.float64).reshape(len(issame), 2, -1)
        # genuine pairs: the same identity; fewer nuisances make its two captures more alike
        sims[name] = np.mean([np.abs(a - b).mean() for (a, b), same in zip(faces, issame) if same])
    assert sims["easy"] < 0.8 * sims["default"], sims


@pytest.mark.parametrize("kwargs, msg", [
    ({"num_ids": 0}, "num_ids=0"), ({"imgs_per_id": (5, 2)}, "imgs_per_id"), ({"imgs_per_id": 3}, "pair"),
    ({"ijbc_subjects": 2}, "ijbc_subjects"), ({"lfw_pairs": 1}, "lfw_pairs"), ({"seed": -1}, "seed"),
    ({"nuisance": 0.0}, "nuisance=0.0"), ({"nuisance": 3}, "nuisance=3"), ({"nuisance": "low"}, "nuisance"),
])
def test_spec_validation(kwargs: dict, msg: str) -> None:
    with pytest.raises(SyntheticError, match=msg):
        SyntheticSpec(**kwargs)
