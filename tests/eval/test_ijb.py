"""facecompat.eval.ijb: meta parsing, pooling, pair scores and the 1:1 / 1:N evaluations."""

from __future__ import annotations

import importlib.util
import io
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from facecompat.eval import ijb, metrics
from tests.helpers.data import subject_features


def _pool_reference(features, template_ids, media_ids, weights=None):
    """insightface's image2template_feature, loop for loop."""
    feats = features * weights[:, None] if weights is not None else features
    templates = np.unique(template_ids)
    out = np.zeros((len(templates), features.shape[1]), np.float64)
    for k, t in enumerate(templates):
        ind = np.where(template_ids == t)[0]
        medias = []
        for m in np.unique(media_ids[ind]):
            medias.append(feats[ind[media_ids[ind] == m]].mean(axis=0))
        out[k] = np.sum(medias, axis=0)
    return templates, out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("weighted", [False, True])
def test_pool_templates_matches_loop(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    n = 500
    tids = rng.integers(1, 60, n) * 7
    mids = rng.integers(0, 4, n) + tids * 10  # media ids unique to their template
    feats = rng.standard_normal((n, 16)).astype(np.float32)
    weights = rng.uniform(0.3, 1.0, n).astype(np.float32) if weighted else None
    templates, pooled = ijb.pool_templates(feats, tids, mids, weights)
    ref_t, ref = _pool_reference(feats, tids, mids, weights)
    np.testing.assert_array_equal(templates, ref_t)
    np.testing.assert_allclose(pooled, ref, atol=1e-5)
    assert pooled.dtype == np.float32
    # faces with template id -1 are skipped
    tids2 = tids.copy()
    tids2[:10] = -1
    t2, _ = ijb.pool_templates(feats, tids2, mids, weights)
    assert -1 not in t2


@pytest.mark.parametrize("block", [4, 16, 64, 1000])
@pytest.mark.parametrize("num_templates", [50, 300])
def test_score_pairs_matches_direct_dot(block: int, num_templates: int) -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((num_templates, 8)).astype(np.float32)
    g = rng.standard_normal((num_templates, 8)).astype(np.float32)
    i1, i2 = rng.integers(0, num_templates, 3000), rng.integers(0, num_templates, 3000)
    i1[:10], i2[:10] = 3, 7  # repeated pairs
    # min_density 0: sampled dot products per band (bands denser than themselves: one GEMM);
    # min_density 10: row gathers
    for density in (0.0, 10.0):
        cross = ijb.score_pairs(q, g, i1, i2, block=block, min_density=density)
        assert cross.dtype == np.float32 and cross.shape == (3000,)
        np.testing.assert_allclose(cross, np.sum(q[i1] * g[i2], axis=1), atol=1e-5)
        self_scores = ijb.score_pairs(q, q, i1, i2, block=block, min_density=density)
        np.testing.assert_allclose(self_scores, np.sum(q[i1] * q[i2], axis=1), atol=1e-5)
    assert ijb.score_pairs(q, g, i1[:0], i2[:0]).shape == (0,)


# ------------------------------------------------------------------------------------- meta files
def test_load_meta_counts_match_files(synthetic_tiny: Path) -> None:
    meta = ijb.load_ijb_meta(synthetic_tiny, "IJBC")
    meta_dir = synthetic_tiny / "IJBC" / "meta"
    pts_lines = (meta_dir / "ijbc_name_5pts_score.txt").read_text().splitlines()
    pair_lines = (meta_dir / "ijbc_template_pair_label.txt").read_text().splitlines()
    assert meta.num_faces == len(pts_lines)
    assert meta.landmarks.shape == (len(pts_lines), 5, 2)
    first = pts_lines[0].split()
    assert meta.image_names[0] == first[0]
    np.testing.assert_allclose(meta.landmarks[0].ravel(), np.array(first[1:11], float), rtol=1e-6)
    assert meta.det_scores[0] == pytest.approx(float(first[11]))
    assert len(meta.pair_t1) == len(pair_lines)
    assert int(meta.pair_labels.sum()) == sum(line.split()[2] == "1" for line in pair_lines)
    tid_lines = (meta_dir / "ijbc_face_tid_mid.txt").read_text().splitlines()
    tid_mid = {ln.split()[0]: ln.split()[1:] for ln in tid_lines}
    for k in (0, meta.num_faces - 1):
        assert [str(meta.template_ids[k]), str(meta.media_ids[k])] == tid_mid[meta.image_names[k]]
    assert meta.has_1n and set(meta.galleries) == {"G1", "G2"}
    groups = [meta.probes, *meta.galleries.values()]
    all_templates = np.concatenate([g.template_ids for g in groups])
    assert sorted(all_templates.tolist()) == sorted(np.unique(meta.template_ids).tolist())


@pytest.fixture()
def meta_copy(synthetic_tiny: Path, tmp_path: Path) -> Path:
    shutil.copytree(synthetic_tiny / "IJBC" / "meta", tmp_path / "IJBC" / "meta")
    return tmp_path


def _edit(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_meta_errors_name_the_file(meta_copy: Path) -> None:
    meta_dir = meta_copy / "IJBC" / "meta"
    names = ("name_5pts_score", "face_tid_mid", "template_pair_label")
    pts, tid, pairs = (meta_dir / f"ijbc_{n}.txt" for n in names)
    backup = {p: p.read_text() for p in (pts, tid, pairs)}

    def expect(file_name: str, match: str = "") -> None:
        with pytest.raises(ijb.IJBMetaError, match=match) as err:
            ijb.load_ijb_meta(meta_copy)
        assert file_name in str(err.value)
        assert "\n" not in str(err.value)
        for p, text in backup.items():
            p.write_text(text)

    pts.unlink()
    expect("ijbc_name_5pts_score.txt", "missing")
    _edit(pts, lambda ls: ls[1:])  # a face without a landmarks line
    expect("ijbc_face_tid_mid.txt", "1.jpg")
    _edit(pts, lambda ls: [ls[0], " ".join(ls[1].split()[:-1]), *ls[2:]])  # bad number of columns
    expect("ijbc_name_5pts_score.txt:2", "columns")
    _edit(pts, lambda ls: [ls[0].replace(ls[0].split()[3], "abc", 1), *ls[1:]])
    expect("ijbc_name_5pts_score.txt:1", "number")
    _edit(pairs, lambda ls: [*ls, "1 999999 0"])  # a pair template with no face
    expect("ijbc_template_pair_label.txt", "999999")
    _edit(tid, lambda ls: [*ls[:-1], ls[-1] + " 7"])
    expect("ijbc_face_tid_mid.txt:", "columns")

    csv = meta_dir / "ijbc_1N_gallery_G1.csv"
    text = csv.read_text()
    _edit(csv, lambda ls: [*ls, ls[1].split(",", 2)[0] + ",123456," + ls[1].split(",", 2)[2]])
    with pytest.raises(ijb.IJBMetaError, match="two subjects") as err:
        ijb.load_ijb_meta(meta_copy)
    assert "ijbc_1N_gallery_G1.csv" in str(err.value)
    csv.write_text(text)
    _edit(csv, lambda ls: [*ls, "1,2,3"])
    with pytest.raises(ijb.IJBMetaError, match="ijbc_1N_gallery_G1.csv:.*columns"):
        ijb.load_ijb_meta(meta_copy)
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"):
        (meta_dir / name).unlink()
    assert not ijb.load_ijb_meta(meta_copy).has_1n  # 1:N files are optional: none at all is 1:1 only


def test_allow_missing_skips_and_counts(meta_copy: Path) -> None:
    meta_dir = meta_copy / "IJBC" / "meta"
    _edit(meta_dir / "ijbc_name_5pts_score.txt", lambda ls: ls[1:])
    _edit(meta_dir / "ijbc_template_pair_label.txt", lambda ls: [*ls, "1 999999 0", "999998 2 1"])
    meta = ijb.load_ijb_meta(meta_copy, allow_missing=True)
    assert meta.num_missing_faces == 1
    assert meta.num_missing_pairs == 2
    assert 999999 not in meta.pair_t2


# ------------------------------------------------------------------------------- the IJB folder
def _meta_as(src: Path, dst: Path, target: str) -> Path:
    """A copy of an IJB-C meta folder at ``dst`` named for ``target`` (IJB-B: ijbb_*, S1/S2)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        name = f.name
        if target == "IJBB":
            name = name.replace("ijbc_", "ijbb_").replace("_G1", "_S1").replace("_G2", "_S2")
        shutil.copy(f, dst / name)
    return dst


@pytest.mark.parametrize("layout", ["IJB_release/IJBC", "mydata", "ijbc", "root-holding-IJBC"])
def test_the_ijb_folder_is_found_by_its_content(synthetic_tiny: Path, tmp_path: Path, layout: str) -> None:
    """insightface's ``IJB_release/IJBC``, a folder named anything, and a root holding ``IJBC/``:
    one rule for every tool (catalog.target_dir is the same function)."""
    from facecompat.eval.catalog import target_dir

    folder = tmp_path / ("data/IJBC" if layout == "root-holding-IJBC" else layout)
    _meta_as(synthetic_tiny / "IJBC" / "meta", folder / "meta", "IJBC")
    given = folder.parent if layout == "root-holding-IJBC" else folder
    assert ijb.find_target_dir(given, "IJBC") == folder
    assert ijb.find_target_dir(folder, "IJBC") == folder  # its own answer again: the same folder
    assert target_dir(given, "IJBC") == folder
    expected = ijb.load_ijb_meta(synthetic_tiny)
    for root in (given, folder):
        meta = ijb.load_ijb_meta(root, "IJBC")
        assert meta.num_faces == expected.num_faces and meta.has_1n


def test_insightface_release_root_holds_both_targets(synthetic_tiny: Path, tmp_path: Path) -> None:
    release = tmp_path / "IJB_release"
    _meta_as(synthetic_tiny / "IJBC" / "meta", release / "IJBC" / "meta", "IJBC")
    _meta_as(synthetic_tiny / "IJBC" / "meta", release / "IJBB" / "meta", "IJBB")
    assert ijb.find_target_dir(release, "IJBC") == release / "IJBC"
    assert ijb.find_target_dir(release, "IJBB") == release / "IJBB"
    # an IJB-B folder is not an IJB-C folder, whatever it holds for IJB-B
    with pytest.raises(ijb.IJBMetaError, match="IJBC meta files"):
        ijb.find_target_dir(release / "IJBB", "IJBC")


def test_missing_folder_errors_name_the_path_looked_at(tmp_path: Path) -> None:
    (tmp_path / "IJBC").mkdir()  # an empty IJBC/: the error names IJBC/meta, never IJBC/IJBC/meta
    for given in (tmp_path, tmp_path / "IJBC"):
        with pytest.raises(ijb.IJBMetaError) as err:
            ijb.load_ijb_meta(given, "IJBC")
        message = str(err.value)
        assert message.startswith(f"{tmp_path / 'IJBC' / 'meta'}: no IJBC meta files"), message
        assert "IJBC/IJBC" not in message and "\n" not in message
    (tmp_path / "other").mkdir()  # a folder of any name: both places named
    with pytest.raises(ijb.IJBMetaError, match="other/meta: no IJBC meta files.*, nor in .*other/IJBC/meta"):
        ijb.find_target_dir(tmp_path / "other", "IJBC")
    with pytest.raises(ijb.IJBMetaError, match="absent: no such folder"):
        ijb.load_ijb_meta(tmp_path / "absent", "IJBC")
    with pytest.raises(ijb.IJBMetaError, match="'IJBX'"):
        ijb.find_target_dir(tmp_path, "IJBX")


_ONE_N = {"IJBC": ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"),
          "IJBB": ("ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv", "ijbb_1N_probe_mixed.csv")}


@pytest.mark.parametrize("target", ["IJBC", "IJBB"])
@pytest.mark.parametrize("removed", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)])
def test_a_partly_present_1n_set_is_an_error(synthetic_tiny: Path, tmp_path: Path, target: str,
                                             removed: tuple[int, ...]) -> None:
    meta_dir = _meta_as(synthetic_tiny / "IJBC" / "meta", tmp_path / target / "meta", target)
    gone = [_ONE_N[target][k] for k in removed]
    for name in gone:
        (meta_dir / name).unlink()
    with pytest.raises(ijb.IJBMetaError, match="missing 1:N file") as err:
        ijb.load_ijb_meta(tmp_path, target)
    message = str(err.value)
    assert all(name in message.split(" (", 1)[0] for name in gone), message  # named as missing
    assert "\n" not in message
    for name in set(_ONE_N[target]) - set(gone):  # all three gone: 1:1 only, as before
        (meta_dir / name).unlink()
    assert not ijb.load_ijb_meta(tmp_path, target).has_1n


# ----------------------------------------------------------------------------------------- end to end
def test_evaluate_perfect_and_random(synthetic_tiny: Path) -> None:
    meta = ijb.load_ijb_meta(synthetic_tiny)
    rng = np.random.default_rng(0)
    good = subject_features(meta, rng, dim=64)
    res, curves = ijb.evaluate_1to1(meta, good, return_curves=True)
    assert res["auc"] == 1.0 and set(res["tar_at_far_strict"].values()) == {1.0}
    # insightface's nearest-point rule on a perfect ROC [(0,0), (0,1), (1,1)]: FAR 0 is nearest
    # every small target and, the ROC being flipped first, the top of that segment is reported
    assert res["tar_at_far"]["1e-04"] == 1.0
    assert res["num_pairs"] == len(meta.pair_t1) == curves["scores"].size
    assert res["num_genuine"] == int(meta.pair_labels.sum())
    cross = ijb.evaluate_1to1(meta, good, good * 2.0)  # scaling does not change cosines
    assert cross["tar_at_far"] == res["tar_at_far"]
    for use_faiss in (True, False):
        one_n = ijb.evaluate_1toN(meta, good, use_faiss=use_faiss)
        assert set(one_n) == {"G1", "G2"}
        for gal in one_n.values():
            assert gal["cmc"] == {"1": 1.0, "5": 1.0, "10": 1.0}
            assert set(gal["tpir_at_fpir"]) == {"0.01", "0.1"}

    noise = rng.standard_normal(good.shape).astype(np.float32)
    assert 0.2 < ijb.evaluate_1to1(meta, noise)["auc"] < 0.8
    # cross model: random gallery model -> chance level
    assert 0.2 < ijb.evaluate_1to1(meta, good, noise)["auc"] < 0.8
    rand_1n = ijb.evaluate_1toN(meta, good, noise)
    assert all(g["cmc"]["1"] < 1.0 for g in rand_1n.values())
    with pytest.raises(ValueError, match="rows"):
        ijb.evaluate_1to1(meta, good[:-1])


def _two_sided_meta(rng: np.random.Generator) -> ijb.IJBMeta:
    """IJB-C's shape in miniature: 6 enrolled templates (G1, G2) in the pair file's first column,
    12 probe templates in its second, one face per media, two medias per template."""
    enrolled, probes = np.arange(1, 7), np.arange(101, 113)
    subject = {t: t for t in enrolled} | {p: 1 + (p - 101) % 6 for p in probes}
    t1, t2 = np.repeat(enrolled, probes.size), np.tile(probes, enrolled.size)
    labels = np.array([subject[a] == subject[b] for a, b in zip(t1, t2)], np.int8)
    templates = np.repeat(np.r_[enrolled, probes], 2)
    n = templates.size
    return ijb.IJBMeta("IJBC", np.array([f"{i}.jpg" for i in range(n)]), np.zeros((n, 5, 2), np.float32),
                       rng.uniform(0.5, 1.0, n).astype(np.float32), templates.astype(np.int64),
                       np.arange(n, dtype=np.int64), t1.astype(np.int64), t2.astype(np.int64), labels,
                       galleries={"G1": ijb.Subjects(enrolled[:3], enrolled[:3]),
                                  "G2": ijb.Subjects(enrolled[3:], enrolled[3:])},
                       probes=ijb.Subjects(probes, np.array([subject[p] for p in probes])))


def test_cross_cell_gallery_model_embeds_the_enrolled_column() -> None:
    """Cell ``query|gallery``: the gallery model embeds each pair's first template (the enrolled side)
    and the 1:N galleries, the query model the second template and the 1:N probes (DESIGN §5), as the
    public cross-model evaluator's ``verification_11(old feats, ..., new feats, ..., p1, p2)``."""
    rng = np.random.default_rng(3)
    meta = _two_sided_meta(rng)
    query = rng.standard_normal((meta.num_faces, 8)).astype(np.float32)
    gallery = rng.standard_normal((meta.num_faces, 8)).astype(np.float32)
    _, curves = ijb.evaluate_1to1(meta, query, gallery, return_curves=True)
    t, q = _pool_reference(query, meta.template_ids, meta.media_ids, meta.det_scores)
    _, g = _pool_reference(gallery, meta.template_ids, meta.media_ids, meta.det_scores)
    row = {int(tid): k for k, tid in enumerate(t)}
    r1 = np.array([row[int(a)] for a in meta.pair_t1])
    r2 = np.array([row[int(b)] for b in meta.pair_t2])
    expected = np.einsum("ij,ij->i", g[r1], q[r2])
    reversed_ = np.einsum("ij,ij->i", q[r1], g[r2])
    assert np.abs(expected - reversed_).max() > 0.1  # the two directions differ on this meta
    np.testing.assert_allclose(curves["scores"], expected, atol=1e-5)
    # TAR@FAR from an independent ROC of the expected scores
    fpr, tpr, _ = metrics.roc_curve(expected, meta.pair_labels)
    res = ijb.evaluate_1to1(meta, query, gallery)
    assert res["tar_at_far"] == metrics.tar_at_far(fpr, tpr)
    # 1:N: probes from the query model, galleries from the gallery model
    one_n = ijb.evaluate_1toN(meta, query, gallery, ranks=(1,), fpirs=(0.1,), use_faiss=False)
    for name, group in meta.galleries.items():
        probe_rows = [row[int(p)] for p in meta.probes.template_ids]
        sim = q[probe_rows] @ g[[row[int(x)] for x in group.template_ids]].T
        mated = np.isin(meta.probes.subject_ids, group.subject_ids)
        best = group.subject_ids[sim.argmax(1)]
        rank1 = float((best == meta.probes.subject_ids)[mated].mean())
        assert one_n[name]["cmc"]["1"] == pytest.approx(rank1)


def test_ijbb_names(synthetic_tiny: Path, tmp_path: Path) -> None:
    src = synthetic_tiny / "IJBC" / "meta"
    dst = tmp_path / "IJBB" / "meta"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        name = f.name.replace("ijbc_", "ijbb_").replace("_G1", "_S1").replace("_G2", "_S2")
        shutil.copy(f, dst / name)
    meta = ijb.load_ijb_meta(tmp_path, "IJBB")
    assert meta.has_1n and set(meta.galleries) == {"S1", "S2"}
    assert ijb.load_ijb_meta(tmp_path / "IJBB", "IJBB").num_faces == meta.num_faces
    with pytest.raises(ijb.IJBMetaError, match="no IJBC meta files.* nor in .*IJBC/meta"):
        ijb.load_ijb_meta(tmp_path, "IJBC")  # an IJB-B root is not an IJB-C one


# ----------------------------------------------------------------------------- fast integer parser
@pytest.mark.parametrize("text", [
    b"1 2 0\n30 4000 1\n",
    b"  1\t2  0  \r\n30 4000 1\r\n",            # odd whitespace, CRLF
    b"1 2 0\n\n  \n30 4000 1",                    # blank lines, no final LF
    b"12345678 87654321 1\n0 00000007 0\n",      # 8 digits, leading zeros
])
def test_parse_int_table_fast_path(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "pairs.txt"
    path.write_bytes(text)
    want = np.array([[int(v) for v in ln.split()] for ln in text.decode().splitlines() if ln.split()])
    fast = ijb._parse_uint_fast(path, 3)
    assert fast is not None
    np.testing.assert_array_equal(fast, want)
    np.testing.assert_array_equal(ijb._parse_int_table(path, 3), want)


def test_parse_int_table_chunks_and_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(0, 10**rng.integers(1, 9, (5000, 3)), dtype=np.int64)
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"{a} {b}  {c}\n" for a, b, c in values.tolist()))
    monkeypatch.setattr(ijb.scan, "_CHUNK_BYTES", 997)  # many chunks, cut inside lines
    np.testing.assert_array_equal(ijb._parse_uint_fast(path, 3), values)
    # what the fast path declines, the general path still reads
    path.write_text("1 123456789012 0\n2 -3 1\n")
    assert ijb._parse_uint_fast(path, 3) is None
    np.testing.assert_array_equal(ijb._parse_int_table(path, 3), [[1, 123456789012, 0], [2, -3, 1]])
    for text in (b"1 2 0\r3 4 1\n", b"1 2 0\x0c\n", b"1 2\n3 4 5 6\n"):  # lone CR, form feed, bad rows
        path.write_bytes(text)
        assert ijb._parse_uint_fast(path, 3) is None
    with pytest.raises(ijb.IJBMetaError, match="pairs.txt:1: expected 3 columns, got 2"):
        ijb._parse_int_table(path, 3)  # 6 numbers on 2 lines, but not 3 per line


@pytest.mark.parametrize("line, match", [
    ("7 8 x", "not a number"), ("7 8", "columns"), ("7 8 0 1", "columns"), ("7 8 1e3", "not a number"),
    ("7 8.5 0", "not a number"),
])
def test_parse_int_table_bad_token_names_the_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(f"1 2 0\n3 4 1\n{line}\n5 6 0\n")
    with pytest.raises(ijb.IJBMetaError, match=f"pairs.txt:3: .*{match}"):
        ijb._parse_int_table(path, 3)


def test_parse_named_table_fast_and_fallback(tmp_path: Path) -> None:
    path = tmp_path / "tid.txt"
    path.write_text("a.jpg 1 10\n  b/c.jpg\t2  20\r\n\nd.jpg 3 30")
    names, values = ijb._parse_named_table(path, 3, int)
    assert names == ["a.jpg", "b/c.jpg", "d.jpg"]
    np.testing.assert_array_equal(values, [[1, 10], [2, 20], [3, 30]])
    path.write_text("ä.jpg 1.5 2\nb.jpg 3 4e1\n")  # non-ASCII name: regex path; floats
    names, values = ijb._parse_named_table(path, 3, float)
    assert names == ["ä.jpg", "b.jpg"]
    np.testing.assert_array_equal(values, [[1.5, 2.0], [3.0, 40.0]])
    path.write_text("a.jpg 1 2\nb.jpg 3 x\n")
    with pytest.raises(ijb.IJBMetaError, match="tid.txt:2: not a number"):
        ijb._parse_named_table(path, 3, int)


# ----------------------------------------------------------------------------- fast decimal parser
def _decimal_tokens(rng: np.random.Generator, n: int) -> list[str]:
    """Plain decimals of up to 15 significant digits (integer part <= 8, fraction <= 7 digits)."""
    whole = rng.integers(0, 10 ** rng.integers(1, 9, n))
    frac_digits = rng.integers(0, 8, n)
    frac = rng.integers(0, 10**frac_digits)
    return [f"{w}.{str(f).zfill(k)}" if k else str(w)
            for w, f, k in zip(whole.tolist(), frac.tolist(), frac_digits.tolist())]


def test_parse_decimal_fast_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    tokens = _decimal_tokens(rng, 60_000) + ["0.99998", "84.213", "0.1", "0.3", "9007199.25474099", "007.50"]
    tokens = tokens[:len(tokens) // 6 * 6]
    want = np.array([float(t) for t in tokens]).reshape(-1, 6)
    text = "".join(" ".join(tokens[i:i + 6]) + "\n" for i in range(0, len(tokens), 6))
    monkeypatch.setattr(ijb.scan, "_CHUNK_BYTES", 4093)  # many chunks, cut inside lines
    got = ijb._parse_decimal_fast(io.BytesIO(text.encode()), 6)
    assert got is not None and got.dtype == np.float64
    assert got.tobytes() == want.tobytes()  # bit for bit what float(token) gives
    # the 5-point file shape, names with '/', odd whitespace: through _parse_named_table
    path = tmp_path / "pts.txt"
    lines = [f"{i}/img {i}.jpg".split()[0] + f".{i}.jpg " + " ".join(tokens[11 * i:11 * i + 11])
             for i in range(200)]
    path.write_text("\r\n".join(lines) + "\r\n\n\t\n")
    names, values = ijb._parse_named_table(path, 12, float)
    assert names == [ln.split()[0] for ln in lines]
    assert values.tobytes() == np.array([[float(t) for t in ln.split()[1:]] for ln in lines]).tobytes()


@pytest.mark.parametrize("token", ["-1.5", "+2", "1e3", "1.5E-2", "inf", "nan", ".5", "5.", "1.2.3",
                                   "123456789.5", "99999999.99999999"])
def test_parse_decimal_fast_declines_the_unusual(tmp_path: Path, token: str) -> None:
    text = f"a.jpg 1.25 {token}\nb.jpg 0.5 2\n"
    assert ijb._parse_decimal_fast(io.BytesIO(text.replace("a.jpg", "").replace("b.jpg", "").encode()),
                                   2) is None
    path = tmp_path / "pts.txt"
    path.write_text(text)
    try:
        want = [[1.25, float(token)], [0.5, 2.0]]
    except ValueError:  # not a Python float either: the line-by-line path names the line
        with pytest.raises(ijb.IJBMetaError, match="pts.txt:1: not a number"):
            ijb._parse_named_table(path, 3, float)
        return
    names, values = ijb._parse_named_table(path, 3, float)  # np.fromstring reads what is valid
    assert names == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(values, want)


def test_parse_decimal_wrong_columns_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pts.txt"
    path.write_text("a.jpg 1.5 2.5\nb.jpg 1.5\nc.jpg 1.5 2.5 3.5\n")  # 6 numbers, 3 names, not 2 per line
    with pytest.raises(ijb.IJBMetaError, match="pts.txt:2: expected 3 columns, got 2"):
        ijb._parse_named_table(path, 3, float)


# ----------------------------------------------------------------------------------- 1:N CSVs
def _write_csv(path: Path, header: str, rows: list[str], newline: str = "\n") -> Path:
    path.write_text(newline.join([header, *rows]) + newline, newline="")
    return path


def test_subject_csv_fast_matches_csv_module(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tids = rng.integers(1, 5000, 3000)
    subject = rng.integers(0, 10**8, 5000)
    rows = [f"{t},{subject[t]},img/{k}.jpg" for k, t in enumerate(tids.tolist())]
    for header, order, newline in [("TEMPLATE_ID,SUBJECT_ID,FILENAME", (0, 1, 2), "\n"),
                                   ("FILENAME, subject_id ,TEMPLATE_ID", (2, 1, 0), "\r\n")]:
        lines = [",".join(r.split(",")[i] for i in order) for r in rows]
        path = _write_csv(tmp_path / "g.csv", header, lines, newline)
        text = ijb._read_text(path)
        fast = ijb._subject_csv_fast(text)
        assert fast is not None
        slow = ijb._subjects(ijb._subject_csv_rows(path, text))
        np.testing.assert_array_equal(fast.template_ids, slow.template_ids)
        np.testing.assert_array_equal(fast.subject_ids, slow.subject_ids)
        np.testing.assert_array_equal(fast.template_ids, np.unique(tids))
        got = ijb._parse_subject_csv(path)
        np.testing.assert_array_equal(got.subject_ids, subject[got.template_ids])
    # spaces around an id: int() accepts them, and so does the fast path
    spaced = ijb._subject_csv_fast("TEMPLATE_ID,SUBJECT_ID\n 1, 5 \n2,6\n")
    assert spaced is not None and spaced.subject_ids.tolist() == [5, 6]


@pytest.mark.parametrize("rows", [
    ['1,5,"a,b.jpg"', "2,6,c.jpg"],     # quoted field with a comma
    ["1,5,a.jpg", "", "2,6,c.jpg"],      # blank line
    ["1,-5,a.jpg", "2,6,c.jpg"],        # negative subject
    ["123456789,5,a.jpg", "2,6,c.jpg"],  # over 8 digits
])
def test_subject_csv_fallback_reads_the_rest(tmp_path: Path, rows: list[str]) -> None:
    path = _write_csv(tmp_path / "g.csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME", rows)
    assert ijb._subject_csv_fast(ijb._read_text(path)) is None
    want = {int(r.split(",")[0]): int(r.split(",")[1]) for r in rows if r}
    got = ijb._parse_subject_csv(path)
    assert dict(zip(got.template_ids.tolist(), got.subject_ids.tolist())) == want


@pytest.mark.parametrize("header, rows, match", [
    ("TEMPLATE,SUBJECT_ID,FILENAME", ["1,5,a.jpg"], "g.csv:1: header lacks"),
    ("TEMPLATE_ID,SUBJECT_ID,FILENAME", ["1,5,a.jpg", "2,6"], "g.csv:3: expected 3 columns, got 2"),
    ("TEMPLATE_ID,SUBJECT_ID,FILENAME", ["1,5,a.jpg", "2,x,b.jpg"], "g.csv:3: .*not integers"),
    ("TEMPLATE_ID,SUBJECT_ID,FILENAME", ["1,5,a.jpg", "2,6,b.jpg", "1,7,c.jpg"],
     "g.csv:4: template 1 has two subjects"),
])
def test_subject_csv_errors_name_the_line(tmp_path: Path, header: str, rows: list[str], match: str) -> None:
    path = _write_csv(tmp_path / "g.csv", header, rows)
    assert ijb._subject_csv_fast(ijb._read_text(path)) is None
    with pytest.raises(ijb.IJBMetaError, match=match):
        ijb._parse_subject_csv(path)
    path.write_text("")
    with pytest.raises(ijb.IJBMetaError, match="empty file"):
        ijb._parse_subject_csv(path)


# ---------------------------------------------------------------------------------------- 1:N
def _fake_faiss(calls: list) -> types.SimpleNamespace:
    """A stand-in faiss with one 'GPU': the all-pairs product in float64, another summation order."""
    def pairwise_distance_gpu(res, xq, xb, metric):
        calls.append(xq.shape)
        return (xq.astype(np.float64) @ xb.astype(np.float64).T).astype(np.float32)
    return types.SimpleNamespace(get_num_gpus=lambda: 1, StandardGpuResources=lambda: None,
                                 METRIC_INNER_PRODUCT=0, pairwise_distance_gpu=pairwise_distance_gpu)


def test_identify_faiss_and_numpy_agree_with_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    templates = np.arange(1, 401)
    subject = rng.integers(0, 60, templates.size)
    # small-integer features: every product is exact in any summation order, and scores tie often
    feats = rng.integers(-1, 2, (templates.size, 6)).astype(np.float32)
    empty = np.zeros(0, np.int64)
    meta = ijb.IJBMeta("IJBC", np.zeros(0, str), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32),
                       empty, empty, empty, empty, np.zeros(0, np.int8))
    perm = rng.permutation(templates.size)
    gallery_subjects = np.unique(subject)[:40]
    g1 = np.sort(perm[:60][np.isin(subject[perm[:60]], gallery_subjects)])
    g2 = np.sort(perm[60:110])
    probes = np.sort(perm[110:])
    meta.galleries = {"G1": ijb.Subjects(templates[g1], subject[g1]),
                      "G2": ijb.Subjects(templates[g2], subject[g2])}
    meta.probes = ijb.Subjects(templates[probes], subject[probes])
    pooled = ijb.Pooled(templates, feats)
    ranks, fpirs = (1, 2, 5, 10), (0.01, 0.1, 0.3)
    plain = ijb.identify_1toN(meta, pooled, ranks=ranks, fpirs=fpirs, use_faiss=False)
    # The real module is imported first and put back afterwards: importing faiss a second time
    # (after a stand-in left sys.modules) would wrap its SWIG classes twice for the whole session.
    real = importlib.import_module("faiss") if importlib.util.find_spec("faiss") is not None else None
    calls: list = []
    monkeypatch.setitem(sys.modules, "faiss", _fake_faiss(calls))
    assert ijb.identify_1toN(meta, pooled, ranks=ranks, fpirs=fpirs, use_faiss=True) == plain
    assert len(calls) == 2  # the faiss GPU path ran, once per gallery
    if real is not None:  # the real faiss (CPU: the BLAS product)
        monkeypatch.setitem(sys.modules, "faiss", real)
        assert ijb.identify_1toN(meta, pooled, ranks=ranks, fpirs=fpirs, use_faiss=True) == plain
    # and the loop definitions (tests/eval/test_metrics.py) on the same tied scores
    for name, sub in meta.galleries.items():
        sim = feats[probes] @ feats[sub.template_ids - 1].T
        assert np.isin(sim, np.unique(sim)).all() and np.unique(sim).size < 20  # many ties
        assert plain[name]["cmc"] == metrics.cmc(sim, meta.probes.subject_ids, sub.subject_ids, ranks)
        assert plain[name]["tpir_at_fpir"] == metrics.tpir_at_fpir(sim, meta.probes.subject_ids,
                                                                   sub.subject_ids, fpirs)


def test_meta_cache_reuses_and_notices_edits(meta_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    parsed = ijb.load_ijb_meta(meta_copy)
    first = ijb.load_ijb_meta(meta_copy, cache_dir=cache)
    files = list((cache / "meta").glob("IJBC-*.npz"))
    assert len(files) == 1
    cached = ijb.load_ijb_meta(meta_copy, cache_dir=cache)
    for meta in (first, cached):
        for name in ("image_names", "landmarks", "det_scores", "template_ids", "media_ids", "pair_t1",
                     "pair_t2", "pair_labels"):
            assert np.array_equal(getattr(meta, name), getattr(parsed, name)), name
        assert set(meta.galleries) == set(parsed.galleries)
        assert np.array_equal(meta.probes.subject_ids, parsed.probes.subject_ids)
        assert np.array_equal(meta.galleries["G2"].template_ids, parsed.galleries["G2"].template_ids)
    # an edited meta file (new size and time) is parsed again; the stale cache file goes
    pair_file = meta_copy / "IJBC" / "meta" / "ijbc_template_pair_label.txt"
    lines = pair_file.read_text().splitlines()
    pair_file.write_text("\n".join(lines[:-1]) + "\n")
    edited = ijb.load_ijb_meta(meta_copy, cache_dir=cache)
    assert edited.pair_t1.size == parsed.pair_t1.size - 1
    assert files[0].exists() is False and len(list((cache / "meta").glob("IJBC-*.npz"))) == 1
    # a damaged cache file is parsed again, not trusted
    damaged = next((cache / "meta").glob("IJBC-*.npz"))
    damaged.write_bytes(b"garbage")
    assert ijb.load_ijb_meta(meta_copy, cache_dir=cache).pair_t1.size == edited.pair_t1.size
    # a bad file is still an error with a cache
    (meta_copy / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").write_text("x.jpg 1\n")
    with pytest.raises(ijb.IJBMetaError, match="ijbc_face_tid_mid.txt:1"):
        ijb.load_ijb_meta(meta_copy, cache_dir=cache)
