"""facecompat.index.gallery: faiss exact and IVF cosine search, replacement, compatibility, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from facecompat.index import gallery as gallery_mod  # noqa: E402
from facecompat.index.gallery import GalleryIndex  # noqa: E402
from facecompat.index.store import FeatureStore, IncompatibleError, model_version  # noqa: E402
from tests.helpers.errors import raises_one_line  # noqa: E402

OLD = model_version({"checkpoint_sha1": "a" * 40, "network": "r18"})
NEW = model_version({"checkpoint_sha1": "b" * 40, "network": "r50"})


def _data(num: int = 400, dim: int = 16, num_queries: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((num, dim)).astype(np.float32) * rng.uniform(0.5, 3.0, (num, 1))
    queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
    ids = rng.permutation(num).astype(np.int64) * 7 + 100
    return gallery, queries, ids


def _numpy_topk(gallery: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int):
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = q.astype(np.float64) @ g.astype(np.float64).T
    top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cos, top, 1), ids[top]


def _lists(kind: str, nlist: int) -> dict:
    """IVF settings searching every list (exact), none for the flat index."""
    return {"nlist": nlist, "nprobe": nlist} if kind == "ivf" else {}


def test_exact_search_matches_numpy_cosine() -> None:
    gallery, queries, ids = _data()
    index = GalleryIndex(gallery, ids, use_gpu=False)
    assert index.kind == "flat" and index.ntotal == 400 and index.dim == 16
    scores, found = index.search(queries, 5)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and scores.shape == found.shape == (30, 5)
    want_scores, want_ids = _numpy_topk(gallery, queries, ids, 5)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(found[:, 0], ids[np.argmax(queries @ (gallery / np.linalg.norm(
        gallery, axis=1, keepdims=True)).T, axis=1)])
    # the query's scale does not matter; k = N returns every item
    np.testing.assert_array_equal(index.search(queries * 9.0, 5)[1], found)
    assert sorted(index.search(queries[:1], 400)[1][0].tolist()) == sorted(ids.tolist())
    assert index.search(queries[:0], 3)[0].shape == (0, 3)
    np.testing.assert_array_equal(GalleryIndex(gallery, use_gpu=False).search(queries, 1)[1][:, 0],
                                  np.argsort(ids)[np.searchsorted(np.sort(ids), want_ids[:, 0])])


def test_ivf_full_probe_equals_exact_and_partial_probe_is_close() -> None:
    gallery, queries, ids = _data()
    exact = GalleryIndex(gallery, ids, use_gpu=False)
    ivf = GalleryIndex(gallery, ids, kind="ivf", nlist=8, nprobe=8, use_gpu=False)
    assert ivf.kind == "ivf" and ivf.nlist == 8 and ivf.nprobe == 8
    e_scores, e_ids = exact.search(queries, 10)
    i_scores, i_ids = ivf.search(queries, 10)
    np.testing.assert_array_equal(i_ids, e_ids)
    np.testing.assert_allclose(i_scores, e_scores, atol=1e-5)
    ivf.nprobe = 2  # fewer lists: the best hit found is still a true neighbour's score or below
    p_scores, p_ids = ivf.search(queries, 10)
    assert (p_scores[:, 0] <= e_scores[:, 0] + 1e-5).all() and np.mean(p_ids[:, 0] == e_ids[:, 0]) > 0.3
    with pytest.warns(UserWarning, match="nprobe 99 > nlist 8"):
        ivf.nprobe = 99
    assert ivf.nprobe == 8
    # the default nlist follows 4 sqrt(N), capped at N // 39
    assert GalleryIndex(gallery, kind="ivf", use_gpu=False).nlist == 400 // 39


def test_ivf_small_gallery_falls_back() -> None:
    gallery, queries, ids = _data(num=100)
    with pytest.warns(UserWarning, match="nlist 16 needs >= 624 training vectors, the gallery has 100: "
                                         "using nlist 2"):
        small = GalleryIndex(gallery, ids, kind="ivf", nlist=16, nprobe=2, use_gpu=False)
    assert small.kind == "ivf" and small.nlist == 2
    np.testing.assert_array_equal(small.search(queries, 3)[1], _numpy_topk(gallery, queries, ids, 3)[1])
    with pytest.warns(UserWarning, match="using the exact flat index"):
        tiny = GalleryIndex(gallery[:60], ids[:60], kind="ivf", use_gpu=False)
    assert tiny.kind == "flat"
    with pytest.warns(UserWarning, match="no effect on a flat"):
        GalleryIndex(gallery, ids, nprobe=4, use_gpu=False)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_replace_matches_a_rebuilt_index(kind: str) -> None:
    gallery, queries, ids = _data()
    index = GalleryIndex(gallery, ids, kind=kind, use_gpu=False, **_lists(kind, 8))
    rng = np.random.default_rng(5)
    rows = rng.choice(400, 60, replace=False)
    new = rng.standard_normal((60, 16)).astype(np.float32)
    new[0] = queries[3] * 2.0  # replaced item becomes query 3's exact match
    index.replace(ids[rows], new)
    assert index.ntotal == 400
    updated = gallery.copy()
    updated[rows] = new
    want_scores, want_ids = _numpy_topk(updated, queries, ids, 7)
    scores, found = index.search(queries, 7)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert found[3, 0] == ids[rows[0]] and scores[3, 0] == pytest.approx(1.0, abs=1e-5)
    index.replace(ids[:0], new[:0])  # nothing to do
    raises_one_line(ValueError, "item id 5 is not in the index", index.replace, [5], new[:1])
    raises_one_line(ValueError, "repeat", index.replace, ids[[1, 1]], new[:2])
    raises_one_line(ValueError, "2 ids but 1 replacement", index.replace, ids[:2], new[:1])
    raises_one_line(ValueError, r"expected \[n, 16\]", index.replace, ids[:1], new[:1, :8])
    raises_one_line(ValueError, "row 0 has a NaN", index.replace, ids[:1], np.full((1, 16), np.nan))


def test_store_compatibility(tmp_path: Path) -> None:
    gallery, queries, ids = _data(num=120)
    versions = np.r_[np.zeros(100, int), np.ones(20, int)]
    store = FeatureStore.create(tmp_path / "g", gallery, ids, versions, [OLD, NEW])
    raises_one_line(IncompatibleError, "query version 'r50-bbbbbbbbbbbb' cannot be compared with 100 rows of "
                    "version 'r18-aaaaaaaaaaaa'", GalleryIndex.from_store, store, NEW["id"], use_gpu=False)
    declared = {(NEW["id"], OLD["id"])}
    index = GalleryIndex.from_store(store, NEW, declared, use_gpu=False)
    np.testing.assert_array_equal(index.search(queries, 4)[1], _numpy_topk(gallery, queries, ids, 4)[1])
    index.replace(ids[:3], gallery[:3], NEW["id"])  # the query's own space
    index.replace(ids[:3], gallery[:3], OLD)  # declared compatible
    other = model_version({"checkpoint_sha1": "c" * 40, "network": "r100"})
    raises_one_line(IncompatibleError, "space 'r100-cccccccccccc'", index.replace, ids[:3], gallery[:3],
                    other)
    raises_one_line(ValueError, "name the version", index.replace, ids[:3], gallery[:3])
    # backfilled to the new model: no declaration needed
    full = store.replace(np.arange(100), gallery[:100], NEW, tmp_path / "full")
    assert GalleryIndex.from_store(full, NEW["id"], use_gpu=False).ntotal == 120


def test_bad_inputs_give_one_line_errors() -> None:
    gallery, queries, ids = _data(num=50)
    index = GalleryIndex(gallery, ids, use_gpu=False)
    raises_one_line(ValueError, r"queries: expected \[n, 16\] vectors, got shape \(30, 8\)", index.search,
                    queries[:, :8], 3)
    raises_one_line(ValueError, r"k must be an integer in \[1, 50\]", index.search, queries, 51)
    raises_one_line(ValueError, r"k must be an integer in \[1, 50\]", index.search, queries, 0)
    bad = queries.copy()
    bad[4, 2] = np.nan
    raises_one_line(ValueError, "queries: row 4 has a NaN", index.search, bad, 3)
    raises_one_line(ValueError, "queries: row 0 is a zero vector", index.search, np.zeros((1, 16)), 3)
    raises_one_line(ValueError, "the gallery is empty", GalleryIndex, np.zeros((0, 16), np.float32),
                    use_gpu=False)
    nan_gallery = gallery.copy()
    nan_gallery[31, 0] = np.inf
    raises_one_line(ValueError, "gallery features: row 31 has a NaN", GalleryIndex, nan_gallery,
                    use_gpu=False)
    raises_one_line(ValueError, "gallery id 7 appears more than once", GalleryIndex, gallery[:2], [7, 7],
                    use_gpu=False)
    raises_one_line(ValueError, "gallery ids must be 50 integers", GalleryIndex, gallery, ids[:3],
                    use_gpu=False)
    raises_one_line(ValueError, r"must be \[N, D\]", GalleryIndex, gallery[0], use_gpu=False)
    raises_one_line(ValueError, "kind 'hnsw' is unknown; valid: flat, ivf", GalleryIndex, gallery,
                    kind="hnsw")
    if faiss.get_num_gpus() == 0:
        raises_one_line(ValueError, "use_gpu=True but faiss sees no GPU", GalleryIndex, gallery, use_gpu=True)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_copy_plumbing_with_a_stand_in(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path (search on a copy, ids mapped back, copy dropped on replace), with the 'GPU copy' being
    faiss's own CPU index: what this checks is the bookkeeping, not faiss-gpu."""
    copies: list = []

    def cpu_to_all_gpus(index):
        copies.append(index)
        return faiss.clone_index(index)

    monkeypatch.setattr(gallery_mod, "faiss_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", cpu_to_all_gpus, raising=False)
    gallery, queries, ids = _data()
    index = GalleryIndex(gallery, ids, kind=kind, **_lists(kind, 8))
    assert index.use_gpu
    want = _numpy_topk(gallery, queries, ids, 5)[1]
    np.testing.assert_array_equal(index.search(queries, 5)[1], want)
    np.testing.assert_array_equal(index.search(queries, 5)[1], want)
    assert len(copies) == 1  # one copy, reused
    index.replace(ids[[0, 9]], queries[:2])
    updated = gallery.copy()
    updated[[0, 9]] = queries[:2]
    np.testing.assert_array_equal(index.search(queries, 5)[1], _numpy_topk(updated, queries, ids, 5)[1])
    assert len(copies) == 2  # the copy was made again after the change


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_search_matches_cpu(kind: str) -> None:
    gallery, queries, ids = _data(num=2000, dim=64, num_queries=100)
    cpu = GalleryIndex(gallery, ids, kind=kind, use_gpu=False, **_lists(kind, 16))
    gpu = GalleryIndex(gallery, ids, kind=kind, use_gpu=True, **_lists(kind, 16))
    c_scores, c_ids = cpu.search(queries, 10)
    g_scores, g_ids = gpu.search(queries, 10)
    assert np.mean(g_ids == c_ids) > 0.99
    np.testing.assert_allclose(g_scores, c_scores, atol=1e-4)
    gpu.replace(ids[:5], queries[:5])
    cpu.replace(ids[:5], queries[:5])
    np.testing.assert_array_equal(gpu.search(queries[:5], 1)[1], cpu.search(queries[:5], 1)[1])
