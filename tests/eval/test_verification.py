"""Pair verification: insightface's k-fold protocol, flip TTA extraction, loading, the callback."""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facecompat.data.normalize import normalize_images
from facecompat.data.pairs_bin import PairsBinError, write_pairs_bin
from facecompat.data.synthetic.sets import SyntheticSpec, write_lfw_bin
from facecompat.eval.verification import (
    VerificationCallback,
    VerificationSet,
    evaluate_pairs,
    extract_embeddings,
    load_verification_set,
    verify,
    verify_cross,
)
from tests.helpers import SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "verification"


def _reference_accuracy(emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray,
                        nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """insightface's calculate_roc/calculate_accuracy, loops and all (KFold written out)."""
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(np.subtract(emb_a, emb_b)), 1)
    n = len(issame)
    folds, start = [], 0
    for k in range(nfolds):
        size = n // nfolds + (1 if k < n % nfolds else 0)
        folds.append(list(range(start, start + size)))
        start += size

    def accuracy(threshold: float, d: np.ndarray, same: np.ndarray) -> float:
        correct = 0
        for di, si in zip(d, same):
            predicted = di < threshold
            correct += int(predicted == si)
        return correct / len(d)

    accs, best_thresholds = np.zeros(nfolds), np.zeros(nfolds)
    for k, test in enumerate(folds):
        train = [i for i in range(n) if i not in test] if nfolds > 1 else test
        acc_train = np.array([accuracy(t, dist[train], issame[train]) for t in thresholds])
        best = int(np.argmax(acc_train))
        best_thresholds[k] = thresholds[best]
        accs[k] = accuracy(thresholds[best], dist[test], issame[test])
    return accs, best_thresholds


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _noisy_pairs(rng: np.random.Generator, n: int, dim: int, noise: float) -> tuple[np.ndarray, ...]:
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
    return _unit(a), _unit(b), issame


@pytest.mark.parametrize(("n", "nfolds", "noise"),
                         [(200, 10, 1.0), (97, 10, 0.7), (53, 5, 1.5), (40, 1, 1.0)])
def test_evaluate_pairs_matches_loop_reference(n: int, nfolds: int, noise: float) -> None:
    emb_a, emb_b, issame = _noisy_pairs(np.random.default_rng(n), n, 8, noise)
    accs, thresholds = _reference_accuracy(emb_a, emb_b, issame, nfolds)
    result = evaluate_pairs(emb_a, emb_b, issame, nfolds=nfolds)
    assert result["num_pairs"] == n
    assert result["accuracy"] == pytest.approx(accs.mean(), abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(accs.std(), abs=1e-12)
    assert result["threshold"] == pytest.approx(thresholds.mean(), abs=1e-12)
    assert 0.5 < result["accuracy"] < 1.0  # neither trivial nor hopeless: thresholds matter


def test_evaluate_pairs_perfect_and_random() -> None:
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(300, 16)))
    issame = np.arange(300) % 2 == 0
    other = _unit(rng.normal(size=(300, 16)))
    emb_b = np.where(issame[:, None], emb, other)
    perfect = evaluate_pairs(emb, emb_b, issame)
    assert perfect["accuracy"] == 1.0 and perfect["accuracy_std"] == 0.0 and perfect["auc"] == 1.0
    assert 0 < perfect["threshold"] < 1.0
    a, b = _unit(rng.normal(size=(2000, 16))), _unit(rng.normal(size=(2000, 16)))
    chance = evaluate_pairs(a, b, rng.random(2000) < 0.5)
    assert abs(chance["accuracy"] - 0.5) < 0.05 and abs(chance["auc"] - 0.5) < 0.05


def test_auc_counts_ties_half_and_is_absent_for_one_class() -> None:
    emb_a = np.zeros((4, 2), np.float32)
    emb_a[:, 0] = 1
    emb_b = np.array([[1, 0], [0, 1], [0, 1], [-1, 0]], np.float32)  # distances 0, 2, 2, 4
    issame = np.array([True, True, False, False])
    # genuine {0, 2} vs impostor {2, 4}: 0 wins twice, 2 ties once and wins once -> 3.5 / 4
    assert evaluate_pairs(emb_a, emb_b, issame, nfolds=2)["auc"] == pytest.approx(3.5 / 4)
    assert "auc" not in evaluate_pairs(emb_a, emb_b, np.ones(4, bool), nfolds=2)


def test_evaluate_pairs_rejects_bad_shapes() -> None:
    emb = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="5 embedding pairs for 4"):
        evaluate_pairs(emb, emb, np.ones(4, bool), nfolds=2)
    with pytest.raises(ValueError, match="nfolds"):
        evaluate_pairs(emb, emb, np.ones(5, bool), nfolds=10)
    with pytest.raises(ValueError, match="one shape"):
        evaluate_pairs(emb, emb[:, :3], np.ones(5, bool), nfolds=2)


class _TinyNet(nn.Module):
    """conv + BN + pooling + linear: enough to be asymmetric under a flip and mode-sensitive."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, dim)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_extract_fuses_flip_before_normalising_and_restores_modes() -> None:
    model = _TinyNet()
    model.train()
    model.bn.eval()  # a frozen BN inside a training model must stay frozen
    images = _images(10)
    emb = extract_embeddings(model, images, batch_size=4)
    assert emb.shape == (10, 8) and emb.dtype == np.float32
    assert model.training and model.conv.training and not model.bn.training
    assert len(model.inputs) == 6  # three batches, each plain + flipped
    assert model.inputs[0].dtype == torch.float32 and model.inputs[0].shape[0] == 4
    assert float(model.inputs[0].min()) >= -1.0 and float(model.inputs[0].max()) <= 1.0

    model.eval()
    x = normalize_images(images)
    with torch.no_grad():
        fused = model(x) + model(torch.flip(x, dims=[3]))
    expected = torch.nn.functional.normalize(fused, dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    no_flip = extract_embeddings(model, images, batch_size=16, flip=False)
    np.testing.assert_allclose(no_flip, torch.nn.functional.normalize(model(x), dim=1).detach().numpy(),
                               atol=1e-5)
    assert not np.allclose(no_flip, emb, atol=1e-3)  # the flip does change the embedding
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def _per_batch_embeddings(model: nn.Module, images: torch.Tensor, batch_size: int, flip: bool,
                          autocast_dtype: torch.dtype | None) -> np.ndarray:
    """The loop extract_embeddings ran before it kept the embeddings on the device: every batch
    normalised, embedded (each forward cast to float32), flip-summed, L2-normalised and read back."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            return model(x).float()

    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = (images[start:start + batch_size].float() - 127.5) * np.float32(1 / 127.5)
            emb = forward(x)
            if flip:
                emb = emb + forward(torch.flip(x, dims=[3]))
            chunks.append(torch.nn.functional.normalize(emb, dim=1).cpu().numpy())
    return np.concatenate(chunks)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_extract_equals_the_per_batch_loop_bit_for_bit(flip: bool,
                                                       autocast_dtype: torch.dtype | None) -> None:
    model = _TinyNet()
    images = _images(11)
    emb = extract_embeddings(model, images, batch_size=4, flip=flip, autocast_dtype=autocast_dtype)
    expected = _per_batch_embeddings(model, images, 4, flip, autocast_dtype)
    assert emb.shape == expected.shape == (11, 8) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, expected)


def test_extract_with_a_backbone_equals_the_per_batch_loop_bit_for_bit() -> None:
    from facecompat.models import get_model

    torch.manual_seed(0)
    model = get_model("r18-w0.125", embedding_size=16)
    images = _images(5, size=112, seed=1)
    np.testing.assert_array_equal(extract_embeddings(model, images, batch_size=3),
                                  _per_batch_embeddings(model, images, 3, True, None))
    with pytest.raises(ValueError, match="^no images to embed$"):
        extract_embeddings(model, images[:0])


@pytest.mark.gpu
def test_cuda_extract_waits_for_the_device_once() -> None:
    """The embeddings stay on the GPU until the last batch: one synchronising call (CUDA's sync debug
    mode counts them), not one per batch."""
    model = _TinyNet().cuda()
    images = _images(11)
    extract_embeddings(model, images[:2], device="cuda", autocast_dtype=torch.bfloat16)  # lazy CUDA init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emb = extract_embeddings(model, images, batch_size=4, device="cuda",
                                     autocast_dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1 and Path(syncs[0].filename).name == "verification.py", syncs
    ref = extract_embeddings(model.cpu(), images, batch_size=4, autocast_dtype=torch.bfloat16)
    np.testing.assert_allclose(emb, ref, atol=0.05)


def test_extract_restores_modes_after_an_error() -> None:
    class Broken(_TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = Broken()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_embeddings(model, _images(2))
    assert all(m.training for m in model.modules())


def test_extract_autocast_runs_and_returns_float32() -> None:
    model = _TinyNet()
    emb = extract_embeddings(model, _images(6), batch_size=4, autocast_dtype=torch.bfloat16)
    ref = extract_embeddings(model, _images(6), batch_size=4)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=0.1)


def _random_set(n_pairs: int = 40, size: int = 32) -> VerificationSet:
    return VerificationSet("rand", _images(2 * n_pairs, size), np.arange(n_pairs) % 2 == 0)


def test_cross_with_one_model_equals_self_test() -> None:
    model = _TinyNet()
    vset = _random_set()
    self_result = verify(model, vset, batch_size=16, nfolds=5)
    cross_result = verify_cross(model, model, vset, batch_size=16, nfolds=5)
    assert cross_result == pytest.approx(self_result, abs=1e-9)
    # the cross test embeds each half with its own model, and only that half
    model_a, model_b = _TinyNet(seed=1), _TinyNet(seed=2)
    verify_cross(model_a, model_b, vset, batch_size=100, flip=False, nfolds=5)
    assert [x.shape[0] for x in model_a.inputs] == [40] and [x.shape[0] for x in model_b.inputs] == [40]
    expected_a = (vset.images[0::2].float() - 127.5) * np.float32(1 / 127.5)  # the one normalisation
    np.testing.assert_array_equal(model_a.inputs[0].numpy(), expected_a.numpy())


def test_load_fixture() -> None:
    expected = json.loads((FIXTURES / "tiny.json").read_text())
    vset = load_verification_set(FIXTURES / "tiny.bin")
    assert vset.name == "tiny" and vset.num_pairs == expected["pairs"]
    assert vset.images.shape == (2 * expected["pairs"], 3, 112, 112) and vset.images.dtype == torch.uint8
    assert vset.issame.tolist() == expected["issame"]


def _bin_with(tmp_path: Path, imgs_bgr: list[np.ndarray], name: str = "odd.bin") -> Path:
    path = tmp_path / name
    write_pairs_bin(path, [cv2.imencode(".png", img)[1].tobytes() for img in imgs_bgr],
                    [True] * (len(imgs_bgr) // 2))
    return path


def test_load_resizes_and_converts_to_rgb_chw(tmp_path: Path) -> None:
    big = np.zeros((224, 224, 3), np.uint8)
    big[..., 2] = 200  # red in BGR
    big[:, :112, 1] = 50
    exact = np.full((112, 112, 3), 7, np.uint8)
    vset = load_verification_set(_bin_with(tmp_path, [big, exact]))
    assert vset.images.shape == (2, 3, 112, 112)
    resized = cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(vset.images[0].numpy(), resized[..., ::-1].transpose(2, 0, 1))
    assert vset.images[0, 0].float().mean() == 200 and vset.images[0, 2].float().mean() == 0
    np.testing.assert_array_equal(vset.images[1].numpy(), 7)
    small = load_verification_set(_bin_with(tmp_path, [big, exact]), image_size=56)
    assert small.images.shape == (2, 3, 56, 56)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_verification_set(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"wide\.bin: image 1 is 120x100"):
        load_verification_set(_bin_with(tmp_path, [np.zeros((112, 112, 3), np.uint8),
                                                   np.zeros((100, 120, 3), np.uint8)], "wide.bin"))
    bad = tmp_path / "garbage.bin"
    write_pairs_bin(bad, [b"not an image", b"x"], [True])
    with pytest.raises(PairsBinError, match=r"garbage\.bin: image 0"):
        load_verification_set(bad)
    odd = tmp_path / "odd.bin"  # a file our writer refuses to make: three images for one pair
    odd.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images for 1 pairs"):
        load_verification_set(odd)
    empty = tmp_path / "empty.bin"
    write_pairs_bin(empty, [], [])
    with pytest.raises(ValueError, match=r"empty\.bin: holds no pairs"):
        load_verification_set(empty)


class _MeanColour(nn.Module):
    """Embeds an image by its mean colour: perfect on pairs of solid colours."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 4)


def _colour_bin(path: Path, n_pairs: int = 20) -> Path:
    """Genuine pairs: one colour twice; impostor pairs: two colours (corners of the RGB cube)."""
    corners = [np.array([b, g, r], np.uint8) * 255 for b in (0, 1) for g in (0, 1) for r in (0, 1)]
    images, issame = [], []
    for i in range(n_pairs):
        first, genuine = corners[i % 8], i % 2 == 0
        second = first if genuine else corners[(i + 3) % 8]
        for colour in (first, second):
            images.append(cv2.imencode(".png", np.broadcast_to(colour, (112, 112, 3)).copy())[1].tobytes())
        issame.append(genuine)
    write_pairs_bin(path, images, issame)
    return path


def test_callback_keeps_best_and_loads_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    colours = _colour_bin(tmp_path / "colours.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        VerificationCallback([colours, tmp_path / "nope.bin"])
    with pytest.raises(ValueError, match="colours"):
        VerificationCallback([colours, colours])

    callback = VerificationCallback([colours], batch_size=16)
    assert callback.sets is None  # nothing read until the first call
    with caplog.at_level(logging.INFO, logger="facecompat.eval.verification"):
        first = callback(_MeanColour(), step=100, device="cpu")
    assert first == {"colours": 1.0}
    assert "[colours][100]" in caplog.text
    sets = callback.sets
    worse = callback(_Constant(), step=200, device="cpu")
    assert worse == {"colours": pytest.approx(0.5)}  # every distance 0 -> all "same"; half are genuine
    assert callback.sets is sets  # decoded once
    assert callback.last["colours"]["accuracy"] == worse["colours"]
    assert callback.best == {"colours": 1.0}


def test_callback_end_to_end_on_synthetic_lfw(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_ids=2, imgs_per_id=(1, 1), ijbc_subjects=3, lfw_pairs=20, seed=5)
    lfw = tmp_path / "lfw.bin"
    write_lfw_bin(lfw, spec, workers=1, progress=False)
    callback = VerificationCallback([lfw, _colour_bin(tmp_path / "colours.bin")], batch_size=16)
    model = _TinyNet()
    model.train()
    result = callback(model, step=1)
    assert set(result) == {"lfw", "colours"} and all(0.0 <= acc <= 1.0 for acc in result.values())
    assert callback.sets is not None and callback.sets[0].num_pairs == 20
    assert callback.sets[0].images.shape == (40, 3, 112, 112)
    assert callback.best == result and model.training
