"""Face list, aligned crops, batched and distributed extraction, feature cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facecompat.data.align import ARCFACE_TEMPLATE, align_face, estimate_similarity
from facecompat.data.normalize import normalize_images
from facecompat.eval.extract import (
    ALIGNMENT,
    AlignedFaces,
    ExtractError,
    FaceList,
    cache_paths,
    extract_cached,
    extract_features,
    load_cached,
    load_model_for_eval,
    read_face_list,
)
from facecompat.features import default_num_workers, embed_batches
from facecompat.fileio import file_sha1
from facecompat.models import WeightsError, get_model
from tests.helpers.dist import run_distributed

LIST = "meta/ijbc_name_5pts_score.txt"


# --- alignment: the closed form of scikit-image's SimilarityTransform.estimate ----------------------


def _skimage_umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Transcription of ``skimage.transform._geometric._umeyama(src, dst, estimate_scale=True)``."""
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones((dim,))
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = 1 if np.linalg.det(a) >= 0 else -1
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t[:dim]


@pytest.mark.parametrize("seed", range(25))
def test_alignment_equals_skimage_closed_form(seed: int) -> None:
    rng = np.random.default_rng(seed)
    if seed % 2:  # detector-like landmarks around the template
        angle, scale = rng.uniform(-1, 1), rng.uniform(0.5, 3)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = ARCFACE_TEMPLATE @ rot.T + rng.uniform(0, 200, 2) + rng.normal(size=(5, 2)) * 4
        dst = ARCFACE_TEMPLATE
    else:  # arbitrary point sets, a reflection often fits better
        src, dst = rng.normal(size=(2, int(rng.integers(3, 9)), 2)) * 50
    np.testing.assert_allclose(estimate_similarity(src, dst), _skimage_umeyama(src, dst), atol=1e-6)


# --- face list ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ijbc(synthetic_tiny: Path) -> Path:
    return synthetic_tiny / "IJBC"


def _copy_ijbc(src: Path, dst: Path, lines: list[str] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the IJBC folder (images as symlinks) with an optional replaced name list."""
    (dst / "meta").mkdir(parents=True)
    (dst / "loose_crop").mkdir()
    for img in (src / "loose_crop").iterdir():
        if img.name not in drop:
            (dst / "loose_crop" / img.name).symlink_to(img)
    text = (src / LIST).read_text() if lines is None else "\n".join(lines) + "\n"
    (dst / LIST).write_text(text)
    return dst


def test_read_face_list_matches_file(ijbc: Path) -> None:
    lines = [ln.split() for ln in (ijbc / LIST).read_text().splitlines() if ln.strip()]
    faces = read_face_list(ijbc, "IJBC")
    assert len(faces) == len(lines) > 10
    assert faces.names == [ln[0] for ln in lines]
    np.testing.assert_allclose(faces.landmarks[3].reshape(-1), [float(v) for v in lines[3][1:11]])
    np.testing.assert_allclose(faces.scores, [float(ln[11]) for ln in lines], rtol=1e-6)
    assert faces.landmarks.shape == (len(lines), 5, 2) and faces.num_missing == 0
    np.testing.assert_array_equal(faces.rows, np.arange(len(lines)))


@pytest.mark.parametrize("bad, msg", [
    ("x.jpg 1 2 3", r"ijbc_name_5pts_score.txt:3: expected 12 columns"),
    ("x.jpg 1 2 3 4 5 6 7 8 9 ten 0.9", r"ijbc_name_5pts_score.txt:3: non-numeric"),
    ("x.jpg 1 2 3 4 5 6 7 8 9 10 nan", r"ijbc_name_5pts_score.txt:3: non-numeric or non-finite"),
])
def test_read_face_list_rejects_bad_lines(ijbc: Path, tmp_path: Path, bad: str, msg: str) -> None:
    lines = (ijbc / LIST).read_text().splitlines()
    lines[2] = bad
    root = _copy_ijbc(ijbc, tmp_path / "IJBC", lines)
    with pytest.raises(ExtractError, match=msg):
        read_face_list(root)


def test_missing_image_raises_or_is_skipped(ijbc: Path, tmp_path: Path) -> None:
    names = read_face_list(ijbc).names
    root = _copy_ijbc(ijbc, tmp_path / "IJBC", drop=(names[4],))
    with pytest.raises(ExtractError, match=rf"score.txt:5: image '{names[4]}' not found"):
        read_face_list(root)
    faces = read_face_list(root, allow_missing=True)
    assert faces.num_missing == 1 and len(faces) == len(names) - 1
    np.testing.assert_array_equal(faces.missing_rows, [4])
    assert names[4] not in faces.names and faces.rows[4] == 5
    with pytest.raises(ExtractError, match="unknown target"):
        read_face_list(root, "IJBX")


def test_unreadable_image_is_named(ijbc: Path, tmp_path: Path) -> None:
    root = _copy_ijbc(ijbc, tmp_path / "IJBC")
    faces = read_face_list(root)
    bad = root / "loose_crop" / faces.names[2]
    bad.unlink()
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ExtractError, match=rf"{faces.names[2]}: image missing or unreadable"):
        extract_features(TinyNet(), root, faces, batch_size=4, num_workers=0, progress=False)
    bad.unlink()
    with pytest.raises(ExtractError, match=faces.names[2]):
        AlignedFaces(root, faces)[2]


# --- extraction -----------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Deterministic conv + BN + pool + linear backbone counting its forward calls."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, dim)
        with torch.no_grad():  # non-trivial running statistics: eval and train mode differ
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.embedding_size = dim
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(h.flatten(1))


def _head(faces: FaceList, n: int) -> FaceList:
    return FaceList(faces.names[:n], faces.landmarks[:n], faces.scores[:n], faces.rows[:n],
                    source=faces.source)


def _by_hand(model: nn.Module, root: Path, faces: FaceList, i: int, flip: bool = True) -> np.ndarray:
    img = cv2.cvtColor(cv2.imread(str(root / "loose_crop" / faces.names[i])), cv2.COLOR_BGR2RGB)
    crop = align_face(img, faces.landmarks[i])
    x = normalize_images(torch.from_numpy(crop).permute(2, 0, 1)[None])
    with torch.no_grad():
        model.eval()
        emb = model(x) + (model(x.flip(3)) if flip else 0)
    return emb[0].numpy()


def test_extract_features_flip_fusion_and_workers(ijbc: Path) -> None:
    faces = read_face_list(ijbc)
    model = TinyNet().train()
    feats = extract_features(model, ijbc, faces, batch_size=16, num_workers=0, progress=False)
    assert feats.shape == (len(faces), 8) and feats.dtype == np.float32
    assert model.training  # mode restored
    assert model.calls == 2 * -(-len(faces) // 16)
    for i in (0, 7, len(faces) - 1):
        np.testing.assert_allclose(feats[i], _by_hand(model, ijbc, faces, i), rtol=1e-5, atol=1e-5)
    plain = extract_features(model, ijbc, faces, batch_size=32, num_workers=0, flip=False, progress=False)
    np.testing.assert_allclose(plain[5], _by_hand(model, ijbc, faces, 5, flip=False), rtol=1e-5, atol=1e-5)
    workers = extract_features(model, ijbc, faces, batch_size=16, num_workers=2, progress=False)
    np.testing.assert_array_equal(workers, feats)


def test_bf16_autocast_returns_float32(ijbc: Path) -> None:
    faces = read_face_list(ijbc)
    sub = _head(faces, 6)
    model = TinyNet()
    ref = extract_features(model, ijbc, sub, num_workers=0, progress=False)
    feats = extract_features(model, ijbc, sub, num_workers=0, autocast_dtype=torch.bfloat16, progress=False)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, rtol=0.05, atol=0.05)


def _plain_loop(model: nn.Module, batches: list[torch.Tensor], flip: bool = True,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The extraction loop as it was: embed a batch, read it back to the host, next batch."""
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                         enabled=autocast_dtype is not None):
        for images in batches:
            x = (images.float() - 127.5) * np.float32(1 / 127.5)  # the training loader's normalisation
            emb = model(x) + model(x.flip(3)) if flip else model(x)
            out.append(emb.float().cpu())
    return torch.cat(out)


def _face_batches(root: Path, faces: FaceList, batch_size: int) -> list[torch.Tensor]:
    dataset = AlignedFaces(root, faces)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return list(images.split(batch_size))


@pytest.mark.parametrize("network", ["tiny", "r18-w0.125"])
def test_features_bit_equal_to_a_plain_per_batch_loop(ijbc: Path, network: str) -> None:
    faces = _head(read_face_list(ijbc), 23)
    torch.manual_seed(0)
    model = TinyNet() if network == "tiny" else get_model(network, embedding_size=16)
    autocast = torch.bfloat16 if network != "tiny" else None  # a backbone: bf16 trunk, fp32 head
    expected = _plain_loop(model, _face_batches(ijbc, faces, 5), autocast_dtype=autocast).numpy()
    for workers in (0, None):  # None: default_num_workers(), at least one worker process
        feats = extract_features(model, ijbc, faces, batch_size=5, num_workers=workers,
                                 autocast_dtype=autocast, progress=False)
        np.testing.assert_array_equal(feats, expected)


def test_embed_batches_fills_one_device_buffer() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=generator)
               for n in (3, 5, 1)]
    model = TinyNet().train()
    expected = _plain_loop(model, batches)
    model.train()
    for num_rows in (None, 9, 2):  # grown by doubling, exact, too small (grown again)
        feats = embed_batches(model, iter(batches), device="cpu", num_rows=num_rows)
        assert feats.shape == (9, 8) and feats.dtype == torch.float32 and feats.device.type == "cpu"
        assert not feats.is_inference()  # the caller may change it in place
        torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    assert model.training  # mode restored
    plain = embed_batches(model, batches, device="cpu", flip=False)
    torch.testing.assert_close(plain, _plain_loop(model, batches, flip=False), rtol=0, atol=0)
    rounded = embed_batches(TinyNet(), batches, device="cpu", autocast_dtype=torch.bfloat16)
    assert rounded.dtype == torch.float32  # TinyNet's output is bf16 under autocast
    torch.testing.assert_close(rounded, _plain_loop(TinyNet(), batches, autocast_dtype=torch.bfloat16),
                               rtol=0, atol=0)
    assert embed_batches(model, [], device="cpu").shape == (0, 0)


def test_default_workers_follow_the_machine(monkeypatch: pytest.MonkeyPatch, ijbc: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == max(1, min(cores - 1, 8))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: still one each
    assert default_num_workers() == 1
    with pytest.raises(ValueError, match="num_workers must be >= 0.*got -1"):
        extract_features(TinyNet(), ijbc, read_face_list(ijbc), num_workers=-1, progress=False)


@pytest.mark.gpu
def test_embed_batches_never_waits_for_the_gpu() -> None:
    """No host sync inside the loop (CUDA's sync debug mode turns one into an error)."""
    torch.manual_seed(0)
    model = get_model("r18-w0.125", embedding_size=16).cuda().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=generator).pin_memory()
               for n in (8, 8, 3)]
    embed_batches(model, batches[:1], device="cuda", autocast_dtype=torch.bfloat16)  # lazy CUDA init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        feats = embed_batches(model, batches, device="cuda", autocast_dtype=torch.bfloat16)
        again = embed_batches(model, batches, device="cuda", autocast_dtype=torch.bfloat16, num_rows=19)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert feats.shape == (19, 16) and feats.dtype == torch.float32 and feats.is_cuda
    torch.testing.assert_close(feats, again, rtol=0, atol=0)
    expected = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for images in batches:  # the per-batch loop with a read-back that extraction used to run
            x = images.cuda().float().sub_(127.5).mul_(1 / 127.5)  # the one normalisation on CUDA
            expected.append((model(x) + model(x.flip(3))).float().cpu())
    torch.testing.assert_close(feats.cpu(), torch.cat(expected), rtol=1e-5, atol=1e-5)


# --- cache ----------------------------------------------------------------------------------------


def test_cache_reuse_and_stale_fingerprint(ijbc: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    model = TinyNet()
    fp = {"checkpoint_sha1": "aaa", "network": "tiny"}
    kw = {"batch_size": 32, "num_workers": 0, "progress": False}
    feats = extract_cached(model, "old", fp, ijbc, "IJBC", tmp_path, **kw)
    calls = model.calls
    assert calls > 0
    npy, meta = cache_paths(tmp_path, "old", "IJBC")
    assert npy == tmp_path / "features" / "old" / "IJBC.npy"
    stored = json.loads(meta.read_text())
    assert stored == {**fp, "flip": True, "alignment": ALIGNMENT, "face_list_sha1": file_sha1(ijbc / LIST),
                      "num_faces": feats.shape[0], "dim": 8}

    again = extract_cached(model, "old", fp, ijbc, "IJBC", tmp_path, **kw)
    assert model.calls == calls  # reused: no forward pass
    np.testing.assert_array_equal(again, feats)
    np.testing.assert_array_equal(load_cached(tmp_path, "old", "IJBC", stored), feats)

    other = TinyNet(seed=1)
    with caplog.at_level(logging.WARNING, logger="facecompat.eval.extract"):
        new = extract_cached(other, "old", {**fp, "checkpoint_sha1": "bbb"}, ijbc, "IJBC", tmp_path, **kw)
    assert other.calls > 0 and "checkpoint_sha1" in caplog.text
    assert not np.allclose(new, feats)
    assert json.loads(meta.read_text())["checkpoint_sha1"] == "bbb"
    with pytest.raises(ExtractError, match="checkpoint_sha1"):
        load_cached(tmp_path, "old", "IJBC", stored)

    before = other.calls
    unflipped = extract_cached(other, "old", {**fp, "checkpoint_sha1": "bbb"}, ijbc, "IJBC", tmp_path,
                               flip=False, **kw)
    assert other.calls > before and not np.allclose(unflipped, new)
    np.save(npy, unflipped[:5])  # truncated features: never used
    before = other.calls
    extract_cached(other, "old", {**fp, "checkpoint_sha1": "bbb"}, ijbc, "IJBC", tmp_path, flip=False, **kw)
    assert other.calls > before
    with pytest.raises(ExtractError, match="no cache"):
        load_cached(tmp_path, "new", "IJBC")


def test_load_model_for_eval(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = get_model("r18-w0.125", embedding_size=16)
    torch.save(src.state_dict(), tmp_path / "model.pt")
    model = load_model_for_eval("r18-w0.125", tmp_path / "model.pt", embedding_size=16)
    assert not model.training
    for key, value in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(WeightsError):
        load_model_for_eval("r18-w0.125", tmp_path / "model.pt", embedding_size=32)


# --- distributed ----------------------------------------------------------------------------------


def _extract_on_ranks(rank: int, world_size: int, root: str, cache_dir: str, broken_root: str) -> dict:
    faces = read_face_list(root)
    model = TinyNet()
    kw = {"batch_size": 8, "num_workers": 0, "progress": False}
    try:  # the last face's image is unreadable: rank 1 fails, rank 0 must not hang in the gather
        extract_features(model, broken_root, read_face_list(broken_root), **kw)
        failure = ""
    except ExtractError as err:
        failure = str(err)

    before = model.calls
    full = extract_features(model, root, faces, **kw)
    full_calls = model.calls - before
    return {"full": full, "full_calls": full_calls,
            "odd": extract_features(model, root, _head(faces, 7), **kw),
            "one": extract_features(model, root, _head(faces, 1), **kw),
            "cached": extract_cached(model, "m", {"checkpoint_sha1": "x", "network": "tiny"}, root, "IJBC",
                                     cache_dir, **kw),
            "calls": model.calls, "failure": failure}


def test_two_process_extraction_equals_single_process(ijbc: Path, tmp_path: Path) -> None:
    faces = read_face_list(ijbc)
    broken = _copy_ijbc(ijbc, tmp_path / "broken" / "IJBC")
    (broken / "loose_crop" / faces.names[-1]).unlink()
    (broken / "loose_crop" / faces.names[-1]).write_bytes(b"")
    results = run_distributed(_extract_on_ranks, 2, str(ijbc), str(tmp_path), str(broken))
    ref = extract_features(TinyNet(), ijbc, faces, batch_size=8, num_workers=0, progress=False)
    for res in results:
        np.testing.assert_allclose(res["full"], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["odd"], ref[:7], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["one"], ref[:1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["cached"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_cached(tmp_path, "m", "IJBC"), ref, rtol=1e-5, atol=1e-6)
    assert [r["full_calls"] for r in results] == [2 * -(-len(faces) // 2 // 8)] * 2  # a shard each
    assert "another rank" in results[0]["failure"]
    assert f"{faces.names[-1]}: image missing or unreadable" in results[1]["failure"]
