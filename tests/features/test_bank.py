"""Old-feature bank: on-disk format, statistics against their definitions, building (resumed, 2 ranks)
on generated data with a real backbone, mismatch errors (tools/extract_features.py: tests/tools)."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from facecompat.data.faces import FaceRecords, to_tensor
from facecompat.data.loader import BatchKey, _BatchReader
from facecompat.data.normalize import normalize_images
from facecompat.features import BankError, FeatureBank, build_bank, default_bank_dir, ensure_bank
from facecompat.features.bank_build import _sorted_view
from facecompat.models.spec import load_model
from tests.helpers.dist import run_distributed
from tests.helpers.models import make_run_dir, model_spec, single_thread

CLASSES = [2, 5, 7, 11, 13, 20, 28]  # the view the builds use (relabelled to 0..6)
BUILD_KW = dict(batch_size=16, num_workers=0, chunk_rows=20, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _model_dict(name: str = "m") -> dict:
    return {"checkpoint_sha1": "ab" * 20, "network": "r18", "embedding_size": 8, "name": name}


def _small_bank(directory: Path, seed: int = 0, n: int = 40, dim: int = 8):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(1000)[:n] + 1
    labels = rng.integers(0, 5, n)
    feats = rng.standard_normal((n, 2, dim)).astype(np.float32)
    return FeatureBank.from_arrays(directory, ids, labels, feats, model=_model_dict()), ids, labels, feats


# --- format ------------------------------------------------------------------------------------------


def test_from_arrays_round_trip_and_lookup(tmp_path):
    bank, ids, labels, feats = _small_bank(tmp_path / "bank")
    order = np.argsort(ids)
    again = FeatureBank.open(tmp_path / "bank")
    for b in (bank, again):
        np.testing.assert_array_equal(b.record_ids, ids[order])
        np.testing.assert_array_equal(b.labels, labels[order])
        np.testing.assert_array_equal(b.features, feats[order].astype(np.float16))
        assert b.embedding_size == 8 and b.meta["model"] == _model_dict() and b.meta["complete"] is True
    assert not again.features.flags.writeable
    pick = np.array([5, 0, 17, 5])
    flipped = np.array([True, False, False, False])
    got = again.lookup(ids[pick], flipped)
    assert got.dtype == np.float32 and got.shape == (4, 8)
    np.testing.assert_array_equal(got, feats[pick, flipped.astype(int)].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(again.rows(ids[pick]), np.searchsorted(ids[order], ids[pick]))
    absent = int(np.setdiff1d(np.arange(1, 2000), ids)[0])
    with pytest.raises(BankError, match=f"record id {absent} is not in the bank"):
        again.rows([ids[0], absent])
    with pytest.raises(BankError, match="not empty"):
        _small_bank(tmp_path / "bank")
    with pytest.raises(BankError, match="appears twice"):
        FeatureBank.from_arrays(tmp_path / "dup", [3, 1, 3], [0, 0, 0], np.zeros((3, 2, 4)), model={})


def _truncate(d: Path) -> None:
    path = d / "features.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _incomplete(d: Path) -> None:
    meta = json.loads((d / "bank.json").read_text())
    (d / "bank.json").write_text(json.dumps({**meta, "complete": False}))


DAMAGE = {
    "truncated features": (_truncate, "features.npy is damaged"),
    "no bank.json": (lambda d: (d / "bank.json").unlink(), "no readable bank.json"),
    "complete false": (_incomplete, "not a complete"),
    "unsorted ids": (lambda d: np.save(d / "record_ids.npy", np.load(d / "record_ids.npy")[::-1].copy()),
                     "not strictly ascending"),
    "float32 features": (lambda d: np.save(d / "features.npy", np.load(d / "features.npy").astype("f4")),
                         "features.npy holds float32"),
    "labels missing": (lambda d: (d / "labels.npy").unlink(), "labels missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_banks_are_refused(tmp_path, damage):
    _small_bank(tmp_path / "bank")
    spoil, message = DAMAGE[damage]
    spoil(tmp_path / "bank")
    with pytest.raises(BankError, match=message) as err:
        FeatureBank.open(tmp_path / "bank")
    assert str(tmp_path / "bank") in str(err.value) and "\n" not in str(err.value)


# --- statistics -----------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _reference(ids: np.ndarray, labels: np.ndarray, feats: np.ndarray, ratios: list[float]):
    """The module docstring's definitions, record by record (float64 except the stored float16)."""
    f = feats.astype(np.float64)
    u = _unit(_unit(f[:, 0]) + _unit(f[:, 1]))
    classes = np.unique(labels)
    v = _unit(f[:, 0])
    w = v / np.linalg.norm(v, axis=0)  # MixBCT: every column to unit L2 norm over the bank
    means, angle_mean, angle_max, count, centres, radius = [], [], [], [], [], []
    dists = np.zeros(len(ids))
    for c in classes:
        members = np.flatnonzero(labels == c)
        m = _unit(u[members].mean(axis=0))
        a = np.arccos(np.clip(u[members] @ m, -1, 1))
        means.append(m)
        angle_mean.append(a.mean())
        angle_max.append(a.max())
        count.append(members.size)
        centres.append(v[members].mean(axis=0))
        d = sorted(np.linalg.norm(v[members] - centres[-1], axis=1))
        n = len(d)
        q1, q3 = (d[int(n / 4)], d[int(3 * n / 4)]) if n >= 4 else (-np.inf, np.inf)
        radius.append(max(x for x in d if q1 - 1.5 * (q3 - q1) <= x <= q3 + 1.5 * (q3 - q1)))
        dists[members] = np.linalg.norm(w[members] - w[members].mean(axis=0), axis=1)
    credible = {}
    for ratio in ratios:
        mask = np.zeros(len(ids), bool)
        for c in classes:
            members = np.flatnonzero(labels == c)
            k = math.ceil(round(ratio * members.size, 9))
            ranked = sorted(members, key=lambda i: (round(dists[i], 9), ids[i]))
            mask[ranked[:k]] = True
        credible[ratio] = mask
    return (classes, np.array(means), np.array(count), np.array(angle_mean), np.array(angle_max), credible,
            np.array(centres), np.array(radius))


def test_statistics_match_their_definitions(tmp_path):
    rng = np.random.default_rng(1)
    dim = 8
    sizes = {7: 5, 3: 1, 11: 2, 4: 6, 9: 13}
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    feats = rng.standard_normal((labels.size, 2, dim)).astype(np.float32)
    feats[labels == 4] = 0.0
    feats[labels == 4, :, 0] = 3.0  # class 4: six identical records, every angle ties at 0
    feats[np.flatnonzero(labels == 9)[[2, 7]]] = feats[np.flatnonzero(labels == 9)[4]]  # a three-way tie
    ids = rng.permutation(500)[:labels.size] + 10
    bank = FeatureBank.from_arrays(tmp_path / "bank", ids, labels, feats, model={}, chunk_rows=7)
    order = np.argsort(ids)
    ratios = [0.9, 0.5, 0.25, 0.1, 1.0]
    classes, means, count, angle_mean, angle_max, credible, centres, radius = _reference(
        ids[order], labels[order], np.asarray(bank.features), ratios)
    stats = bank.class_stats()
    np.testing.assert_array_equal(stats.class_ids, classes)
    np.testing.assert_array_equal(stats.count, count)
    np.testing.assert_allclose(stats.means, means, atol=2e-6)
    np.testing.assert_allclose(stats.angle_mean, angle_mean, atol=2e-3)  # arccos near 1 amplifies float32
    np.testing.assert_allclose(stats.angle_max, angle_max, atol=2e-3)
    np.testing.assert_allclose(stats.centres, centres, atol=2e-6)
    np.testing.assert_allclose(stats.radius, radius, atol=2e-6)
    for ratio in ratios:
        np.testing.assert_array_equal(bank.credible(ratio), credible[ratio], err_msg=f"ratio {ratio}")
    assert bank.credible(1.0).all()
    class4 = np.flatnonzero(bank.labels == 4)
    np.testing.assert_array_equal(bank.credible(0.5)[class4], [True] * 3 + [False] * 3)  # lower ids win ties
    np.testing.assert_array_equal(bank.class_rows([11, 3, 9]), [4, 0, 3])
    with pytest.raises(BankError, match="dataset class 5 has no record"):
        bank.class_rows([3, 5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bank.credible(0.0)
    # written once, memory-mapped by a later open
    again = FeatureBank.open(tmp_path / "bank")
    assert isinstance(again.class_stats().means, np.memmap)
    np.testing.assert_array_equal(again.class_stats().angle_max, stats.angle_max)
    assert isinstance(again.credible(0.9), np.memmap)
    assert (tmp_path / "bank" / "credible_v2_0.9.npy").is_file()


# --- building on generated data ---------------------------------------------------------------------------


def _view(root: Path, classes: list[int] = CLASSES) -> FaceRecords:
    """A relabelled subset in a shuffled record order (the bank must sort it)."""
    view = FaceRecords(root / "train", flip=True, seed=1).subset(classes=classes, relabel=True)
    perm = np.random.default_rng(0).permutation(view.num_images)
    view.record_ids, view.labels = view.record_ids[perm], view.labels[perm]
    return view


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bank_runs")
    return make_run_dir(tmp / "old", seed=0), make_run_dir(tmp / "other", seed=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_tiny, runs):
    directory = tmp_path_factory.mktemp("bank_ref") / "bank"
    bank = build_bank(_view(synthetic_tiny), model_spec(runs[0]), directory, **BUILD_KW)
    return bank


def test_built_features_are_the_old_models_on_image_and_flip(reference, synthetic_tiny, runs):
    view = _view(synthetic_tiny)
    bank = reference
    assert len(bank) == view.num_images and bank.num_extracted == len(bank) and bank.embedding_size == 32
    np.testing.assert_array_equal(bank.record_ids, np.sort(view.record_ids))
    by_id = dict(zip(view.record_ids.tolist(), view.label_map[view.labels].tolist()))
    np.testing.assert_array_equal(bank.labels, [by_id[i] for i in bank.record_ids.tolist()])
    assert set(np.unique(bank.labels)) == set(CLASSES)
    assert bank.meta["num_records"] > bank.meta["chunk_rows"] * 2  # several chunks
    model = load_model(model_spec(runs[0]))
    images = torch.stack([to_tensor(view.read_image(i), False) for i in bank.record_ids.tolist()])
    with torch.inference_mode():
        direct = torch.stack([model(images), model(images.flip(3))], dim=1).numpy()
    stored = np.asarray(bank.features, dtype=np.float32)
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    flipped = np.arange(len(bank)) % 2 == 1
    np.testing.assert_array_equal(bank.lookup(bank.record_ids, flipped),
                                  stored[np.arange(len(bank)), flipped * 1])


def _per_batch_features(model: torch.nn.Module, view: FaceRecords, batch_size: int, chunk_rows: int,
                        autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """float16 [N, 2, D] features of the record-sorted view by the loop build_bank ran before it kept
    a chunk on the device: the same batches (never crossing a chunk's end), each read back on its own
    (``.float().cpu().numpy().astype(float16)``)."""
    reader = _BatchReader(_sorted_view(view), normalize=True)
    num = view.num_images
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast_dtype or torch.float16,
                                                enabled=autocast_dtype is not None):
        for chunk_start in range(0, num, chunk_rows):
            chunk_stop = min(num, chunk_start + chunk_rows)
            for start in range(chunk_start, chunk_stop, batch_size):
                positions = np.arange(start, min(start + batch_size, chunk_stop), dtype=np.int64)
                x = normalize_images(reader.__getitems__(BatchKey(0, positions)).images)
                emb = model(torch.cat([x, x.flip(3)]))
                b = x.shape[0]
                both = torch.stack([emb[:b], emb[b:]], dim=1).float().cpu().numpy()
                with np.errstate(over="ignore"):  # an overflow to inf is what a test may want to see
                    out.append(both.astype(np.float16))
    return np.concatenate(out)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_built_features_equal_the_per_batch_loop_bit_for_bit(reference, synthetic_tiny, runs, tmp_path,
                                                             autocast_dtype):
    view = _view(synthetic_tiny)
    model = load_model(model_spec(runs[0]))
    kw = {**BUILD_KW, "batch_size": 7}  # 20-record chunks: batches of 7, 7, 6 (the last one cut short)
    bank = reference if autocast_dtype is None else \
        build_bank(view, model_spec(runs[0]), tmp_path / "bank", autocast_dtype=autocast_dtype, **kw)
    batch_size = BUILD_KW["batch_size"] if autocast_dtype is None else kw["batch_size"]
    expected = _per_batch_features(model, view, batch_size, BUILD_KW["chunk_rows"], autocast_dtype)
    stored = np.asarray(bank.features)
    assert stored.shape == expected.shape and np.isfinite(expected).all()
    np.testing.assert_array_equal(stored.view(np.uint16), expected.view(np.uint16))


def test_non_finite_feature_names_its_record_and_keeps_the_chunks_before(synthetic_tiny, runs, tmp_path):
    view = _view(synthetic_tiny)
    chunk_rows = BUILD_KW["chunk_rows"]
    plain = _per_batch_features(load_model(model_spec(runs[0])), view, BUILD_KW["batch_size"], chunk_rows)
    peak = np.abs(plain.astype(np.float32)).max(axis=(1, 2))  # per record, sorted by id
    assert peak[chunk_rows:].max() > 1.05 * peak[:chunk_rows].max()  # a later record outgrows chunk 0
    # Scale the output layer so that chunk 0 stays inside float16 and some later records overflow it.
    scale = 2 * 65504.0 / (peak[:chunk_rows].max() + peak[chunk_rows:].max())
    huge = make_run_dir(tmp_path / "huge", seed=0)
    state = torch.load(huge / "model.pt", weights_only=True)
    state["features.weight"] *= scale
    state["features.bias"] *= scale
    torch.save(state, huge / "model.pt")
    expected = _per_batch_features(load_model(model_spec(huge)), view, BUILD_KW["batch_size"], chunk_rows)
    finite = np.isfinite(expected).all(axis=(1, 2))
    first_bad = int(np.flatnonzero(~finite)[0])
    assert finite[:chunk_rows].all() and first_bad >= chunk_rows
    record = int(np.sort(view.record_ids)[first_bad])
    directory = tmp_path / "bank"
    with pytest.raises(BankError, match=rf"^{directory}: the old model's feature of record {record} is not "
                                        r"finite in float16$"):
        build_bank(view, model_spec(huge), directory, **BUILD_KW)
    progress = np.load(directory / "progress.npy")
    bad_chunk = first_bad // chunk_rows
    assert progress[:bad_chunk].all() and progress[bad_chunk:].sum() == 0
    assert not (directory / "bank.json").exists()
    stored = np.load(directory / "features.npy")
    np.testing.assert_array_equal(stored[:bad_chunk * chunk_rows].view(np.uint16),
                                  expected[:bad_chunk * chunk_rows].view(np.uint16))


def test_workers_default_to_the_machines_and_a_negative_count_is_refused(reference, synthetic_tiny, runs,
                                                                         tmp_path):
    view, spec = _view(synthetic_tiny), model_spec(runs[0])
    with pytest.raises(ValueError, match=r"^num_workers must be >= 0 \(0 decodes in this process\), got -1$"):
        build_bank(view, spec, tmp_path / "refused", **{**BUILD_KW, "num_workers": -1})
    assert not (tmp_path / "refused").exists()  # refused before any file is made
    build_bank(view, spec, tmp_path / "bank", **{**BUILD_KW, "num_workers": None})  # worker processes
    _same_files(reference.directory, tmp_path / "bank")


@pytest.mark.gpu
def test_cuda_build_reads_each_chunk_back_once(synthetic_tiny, runs, tmp_path):
    """On a GPU a chunk's features wait on the device until its last batch: CUDA's sync debug mode
    sees the chunk's read-back (features and finite flags: each line once per chunk), nothing per batch."""
    view = _view(synthetic_tiny)
    chunks = -(-view.num_images // BUILD_KW["chunk_rows"])
    kw = {**BUILD_KW, "batch_size": 4}  # 5 batches a chunk: a sync per batch would show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bank = build_bank(view, model_spec(runs[0]), tmp_path / "bank", device="cuda", **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)
             and Path(w.filename).name == "bank_build.py"]
    lines = {w.lineno for w in syncs}
    assert 1 <= len(lines) <= 2 and len(syncs) == chunks * len(lines), [(w.lineno, w.message) for w in syncs]
    ref = _per_batch_features(load_model(model_spec(runs[0])), view, 4,
                              BUILD_KW["chunk_rows"]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(bank.features, np.float32), ref, rtol=2e-2,
                               atol=2e-2 * np.abs(ref).max())


def _same_files(a: Path, b: Path) -> None:
    for name in ("features.npy", "record_ids.npy", "labels.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((d / "bank.json").read_text()) for d in (a, b))
    assert meta_a == meta_b


def test_killed_build_resumes_to_the_same_bytes(reference, synthetic_tiny, runs, tmp_path):
    directory = tmp_path / "bank"
    with pytest.raises(BankError, match="unfinished build"):
        build_bank(_view(synthetic_tiny), model_spec(runs[0]), directory, max_chunks=1, **BUILD_KW)
    assert not (directory / "bank.json").exists()
    assert np.load(directory / "progress.npy").tolist()[:2] == [1, 0]
    with pytest.raises(BankError, match="no readable bank.json"):
        FeatureBank.open(directory)
    bank = ensure_bank(_view(synthetic_tiny), model_spec(runs[0]), directory, **BUILD_KW)
    assert bank.num_extracted == len(bank) - BUILD_KW["chunk_rows"]
    _same_files(reference.directory, directory)
    # a partial build of another model in the directory is refused, not mixed in
    other = tmp_path / "other"
    with pytest.raises(BankError, match="unfinished"):
        build_bank(_view(synthetic_tiny), model_spec(runs[1]), other, max_chunks=1, **BUILD_KW)
    with pytest.raises(BankError, match="unfinished build of another model or dataset .*model"):
        ensure_bank(_view(synthetic_tiny), model_spec(runs[0]), other, **BUILD_KW)


def _two_rank_build(rank: int, world: int, root: str, run_dir: str, directory: str) -> tuple:
    bank = ensure_bank(_view(Path(root)), model_spec(Path(run_dir)), directory, credible_ratios=(0.9,),
                       **BUILD_KW)
    return bank.num_extracted, int(np.asarray(bank.credible(0.9)).sum())


def test_two_ranks_resume_a_one_process_build_to_the_same_bytes(reference, synthetic_tiny, runs, tmp_path):
    directory = tmp_path / "bank"
    with pytest.raises(BankError, match="unfinished"):
        build_bank(_view(synthetic_tiny), model_spec(runs[0]), directory, max_chunks=1, **BUILD_KW)
    results = run_distributed(_two_rank_build, 2, str(synthetic_tiny), str(runs[0]), str(directory))
    expected = (len(reference) - BUILD_KW["chunk_rows"], int(reference.credible(0.9).sum()))
    assert results == [expected, expected]
    _same_files(reference.directory, directory)
    assert (directory / "credible_v2_0.9.npy").is_file() and (directory / "class_means.npy").is_file()


def test_mismatching_banks_are_errors_not_rebuilds(reference, synthetic_tiny, runs):
    directory = reference.directory
    before = (directory / "features.npy").stat().st_mtime_ns
    with pytest.raises(BankError, match="another model .*checkpoint_sha1"):
        ensure_bank(_view(synthetic_tiny), model_spec(runs[1]), directory, **BUILD_KW)
    with pytest.raises(BankError, match=r"of the training view are not in the bank \(first: record id"):
        ensure_bank(_view(synthetic_tiny, CLASSES + [29]), model_spec(runs[0]), directory, **BUILD_KW)
    relabelled = copy.copy(_view(synthetic_tiny))
    relabelled.label_map = relabelled.label_map[[1, 0, 2, 3, 4, 5, 6]]  # classes 2 and 5 swapped
    with pytest.raises(BankError, match="have another class in the bank .*class 5 in the view, 2 in the bank|"
                                        "class 2 in the view, 5 in the bank"):
        ensure_bank(relabelled, model_spec(runs[0]), directory, **BUILD_KW)
    smaller = _view(synthetic_tiny, CLASSES[:3])  # a sub-view of the bank's records is fine
    assert len(ensure_bank(smaller, model_spec(runs[0]), directory, **BUILD_KW)) == len(reference)
    assert (directory / "features.npy").stat().st_mtime_ns == before
    name = default_bank_dir("out", model_spec(runs[0]), _view(synthetic_tiny)).name
    assert name.startswith("old-") and len(name) == len("old-") + 12
    assert default_bank_dir("out", model_spec(runs[1]), _view(synthetic_tiny)).name[4:] != name[4:]
