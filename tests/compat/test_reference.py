"""Statistics and pairings that must match the public reference code (DESIGN §6), each against a
computation written here independently:

- AdvBCT's boundary radius (``Ashespt/AdvBCT`` ``gen_class_meta``): Tukey-fenced largest distance of
  the unit old features to their plain (unnormalised) mean;
- MixBCT's credible samples (``denoise_credible.py``): row- then column-normalised old features,
  Euclidean distance to the class mean, ``ceil(T·n)`` kept, exactly;
- BCT's old classifier from the same training step as the old backbone (``model.pt``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facecompat import checkpoint as ckpt
from facecompat.compat.advbct import AdvBCT
from facecompat.compat.base import CompatContext
from facecompat.compat.bct import BCT, old_labels_of, view_classes
from facecompat.config import ConfigError, load_config
from facecompat.data.loader import build_dataset
from facecompat.features import FeatureBank, fenced_max, keep_counts
from facecompat.heads import PartialFC
from facecompat.train.trainer import Trainer, train
from tests.helpers.compat import DIM, context, new_config, random_bank
from tests.helpers.train import write_config


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bank(tmp_path: Path, labels: np.ndarray, image: np.ndarray, seed: int = 0) -> FeatureBank:
    """A bank whose image features are ``image`` (the flips: other random vectors, to show they are
    not used), record ids shuffled."""
    rng = np.random.default_rng(seed)
    flips = rng.standard_normal(image.shape)
    ids = rng.permutation(len(labels)) * 3 + 5
    features = np.stack([image, flips], 1).astype(np.float16)
    return FeatureBank.from_arrays(tmp_path / "bank", ids, labels, features, model={"name": "hand-made"})


# ------------------------------------------------------------------------------------- AdvBCT radius


def _outlier_class(rng: np.random.Generator, dim: int = 16) -> np.ndarray:
    """40 features: 38 at 0.2-0.35 rad around e0 (random directions, random norms), 2 mislabelled ones
    pointing elsewhere."""
    side = _unit(rng.standard_normal((38, dim)) * (np.arange(dim) > 0))
    angle = rng.uniform(0.2, 0.35, size=(38, 1))
    inliers = np.cos(angle) * np.eye(dim)[0] + np.sin(angle) * side
    outliers = np.stack([np.eye(dim)[1], -np.eye(dim)[0] + 0.3 * np.eye(dim)[2]])
    return np.concatenate([inliers, outliers]) * rng.uniform(0.5, 3.0, size=(40, 1))


def test_advbct_radius_drops_two_outliers_of_forty_as_the_reference(tmp_path):
    rng = np.random.default_rng(4)
    image = np.concatenate([_outlier_class(rng), _outlier_class(rng)[[0, 1, 2, 3, 4, 39]]])
    labels = np.repeat([3, 8], [40, 6])
    bank = _bank(tmp_path, labels, image)
    stats = bank.class_stats()
    feats = np.asarray(bank.features, dtype=np.float64)[:, 0]  # what the bank stored
    big = _unit(feats[np.asarray(bank.labels) == 3])
    centre = big.mean(axis=0)
    d = np.linalg.norm(big - centre, axis=1)
    q1, q3 = np.percentile(d, [25, 75])  # the margins make numpy's quantiles agree with the reference's
    inside = (d >= q1 - 1.5 * (q3 - q1)) & (d <= q3 + 1.5 * (q3 - q1))
    assert inside.sum() == 38 and d[~inside].min() > 2 * d[inside].max()  # the two outliers, far out
    np.testing.assert_allclose(stats.centres[0], centre, atol=1e-5)
    assert np.linalg.norm(stats.centres[0]) < 0.95  # the plain mean, not renormalised
    assert stats.radius[0] == pytest.approx(d[inside].max(), abs=1e-5)
    assert stats.radius[0] < 0.5 * d.max()  # not the largest distance over every image
    small = _unit(feats[np.asarray(bank.labels) == 8])  # 6 images, one mislabelled: fenced too (>= 4)
    ds = np.sort(np.linalg.norm(small - small.mean(axis=0), axis=1))
    assert ds[5] > 2 * ds[4] and stats.radius[1] == pytest.approx(ds[4], abs=1e-5)  # its outlier dropped

    # The method reads that radius and that centre by default.
    view = type("View", (), {"labels": np.array([0, 1]), "label_map": np.array([3, 8]), "num_classes": 2})()
    ctx = CompatContext(params={}, weight=1.0, view=view, head=PartialFC(16, 2), embedding_size=16, bank=bank)
    method = AdvBCT(ctx)
    inputs = method.batch_inputs(np.asarray(bank.record_ids[:2]), np.zeros(2, bool), np.array([0, 1]))
    np.testing.assert_allclose(inputs["radius"].numpy(), stats.radius, rtol=0)
    np.testing.assert_allclose(inputs["centre"].numpy(), stats.centres, rtol=0)


def test_fenced_max_indexes_the_quartiles_as_the_reference():
    # 6 values: the reference's q1 = d[int(6/4)] = 0.2, q3 = d[int(18/4)] = 0.5, upper fence 0.95, so
    # 0.9 stays; numpy's default (linear) quartiles would fence at 0.85 and drop it.
    d = np.array([0.5, 0.9, 0.1, 0.3, 0.2, 0.4])
    s = sorted(d)
    q1, q3 = s[int(len(s) / 4)], s[int(3 * len(s) / 4)]
    want = max(x for x in s if q1 - 1.5 * (q3 - q1) <= x <= q3 + 1.5 * (q3 - q1))
    lin1, lin3 = np.percentile(d, [25, 75])
    assert want == 0.9 and lin3 + 1.5 * (lin3 - lin1) < 0.9
    groups = np.array([1, 1, 1, 1, 1, 1])
    assert fenced_max(d, groups, 3).tolist() == pytest.approx([0.0, 0.9, 0.0])
    # a 3-value group is not fenced; a 4-value group is (q1 = d[1], q3 = d[3])
    three = fenced_max(np.array([0.1, 0.2, 5.0]), np.zeros(3, int), 1)
    four = fenced_max(np.array([0.1, 0.2, 0.21, 5.0, 0.19]), np.array([0, 0, 0, 0, 1]), 2)
    assert three.tolist() == [5.0] and four.tolist() == pytest.approx([5.0, 0.19])
    four_far = fenced_max(np.array([0.10, 0.11, 0.12, 0.13, 5.0]), np.zeros(5, int), 1)
    assert four_far.tolist() == pytest.approx([0.13])  # q1 0.11, q3 0.13: 5.0 is out


# ------------------------------------------------------------------------------------- MixBCT credible


def test_keep_counts_are_exact_ceilings():
    n = np.arange(1, 2001)
    np.testing.assert_array_equal(keep_counts(0.9, n), -(-9 * n // 10))
    assert keep_counts(0.9, np.array([16, 10, 1]))[0] == 15
    assert keep_counts(0.9, np.array([10]))[0] == 9
    assert math.ceil(0.07 * 100) == 8  # float64 gets this one wrong ...
    assert keep_counts(0.07, np.array([100]))[0] == 7  # ... the rule does not
    np.testing.assert_array_equal(keep_counts(0.07, n), -(-7 * n // 100))
    np.testing.assert_array_equal(keep_counts(1.0, n), n)


def _reference_credible(labels: np.ndarray, image: np.ndarray, ratio: float) -> np.ndarray:
    """denoise_credible.py's rule written out: rows to unit length, then columns to unit L2 norm,
    distance to the class mean, the ceil(T·n) nearest of each class (integer arithmetic here)."""
    rows = _unit(image.astype(np.float64))
    w = rows / np.linalg.norm(rows, axis=0)
    mask = np.zeros(len(labels), bool)
    num, den = round(ratio * 100), 100
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        d = np.linalg.norm(w[members] - w[members].mean(axis=0), axis=1)
        mask[members[np.argsort(d)[:-(-num * members.size // den)]]] = True
    return mask


def _angle_ranked(labels: np.ndarray, image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The old rule's ranking (angle of the unit feature to the unit class mean), same counts."""
    rows = _unit(image.astype(np.float64))
    mask = np.zeros(len(labels), bool)
    for c, k in zip(np.unique(labels), keep):
        members = np.flatnonzero(labels == c)
        cos = rows[members] @ _unit(rows[members].mean(axis=0))
        mask[members[np.argsort(-cos)[:k]]] = True
    return mask


def test_credible_mask_is_the_references(tmp_path):
    rng = np.random.default_rng(7)
    dim, sizes = 12, [16, 10, 23, 4, 1, 37]
    labels = np.repeat(np.arange(len(sizes)) * 2 + 1, sizes)
    # classes around their own directions, columns of very different scales: the column
    # normalisation changes who is nearest
    centres = rng.standard_normal((len(sizes), dim))
    image = (np.repeat(centres, sizes, axis=0) + 0.8 * rng.standard_normal((labels.size, dim))) \
        * np.geomspace(0.05, 20.0, dim)
    bank = _bank(tmp_path, labels, image)
    stored = np.asarray(bank.features, dtype=np.float64)[:, 0]
    bank_labels = np.asarray(bank.labels)
    for ratio in (0.9, 0.5):
        got = np.asarray(bank.credible(ratio))
        want = _reference_credible(bank_labels, stored, ratio)
        np.testing.assert_array_equal(got, want, err_msg=str(ratio))
    mask = np.asarray(bank.credible(0.9))
    counts = [int(mask[bank_labels == c].sum()) for c in np.unique(bank_labels)]
    assert counts == [15, 9, 21, 4, 1, 34]  # ceil(0.9 n): 16 keeps 15, 10 keeps 9
    # the data tell the rules apart: ranking by angle keeps other images
    assert not np.array_equal(mask, _angle_ranked(bank_labels, stored, np.array(counts)))
    assert (tmp_path / "bank" / "credible_v2_0.9.npy").is_file()


def test_a_credible_mask_of_the_old_rule_is_not_reused(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], [16, 10])
    _bank(tmp_path, labels, rng.standard_normal((26, 8)))
    np.save(tmp_path / "bank" / "credible_0.9.npy", np.ones(26, bool))  # the old rule's name and file
    again = FeatureBank.open(tmp_path / "bank")
    mask = np.asarray(again.credible(0.9))
    assert [int(mask[np.asarray(again.labels) == c].sum()) for c in (0, 1)] == [15, 9]


# ------------------------------------------------------------------------------------- BCT pairing


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stopped_old_run(tmp_path_factory, synthetic_tiny) -> Path:
    """A real old run stopped one step into its second epoch, right after a mid-epoch checkpoint:
    model.pt is the first epoch's end, the latest checkpoint one step newer."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = load_config(write_config(tmp, synthetic_tiny, "old", **{
        "data.protocol": "exclass", "data.part": "old", "data.val_targets": [], "model.embedding_size": DIM,
        "train.epochs": 2, "train.checkpoint_every": 1}))
    run_dir = tmp / "runs" / "old"
    step = Trainer.train_step

    def stop_in_epoch_two(self, batches):
        if self.position.epoch == 1 and self.position.step_in_epoch == 1:
            raise _Stop
        step(self, batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", stop_in_epoch_two)
        with pytest.raises(_Stop):
            train(cfg, run_dir)
    return run_dir


def _bct(tmp_path: Path, root: Path, old_run: Path) -> tuple[BCT | None, object, object]:
    cfg = new_config(tmp_path, root, old_run, "bct")
    view = build_dataset(cfg.data)
    bank = random_bank(tmp_path / "bank", view)
    old_cfg = load_config(old_run / "config.yaml")
    ctx = context(view, PartialFC(DIM, view.num_classes), bank, old_run_dir=old_run, old_config=old_cfg)
    return ctx, view, old_cfg


def test_bct_takes_the_old_classifier_of_model_pts_step(tmp_path, synthetic_tiny, stopped_old_run):
    kept = ckpt.list_checkpoints(stopped_old_run)
    assert len(kept) == 2
    epoch_end, latest = kept
    steps = [ckpt.load_common(p)["position"] for p in kept]
    assert steps[0]["step_in_epoch"] == 0 and steps[1]["step_in_epoch"] == 1  # model.pt's step, one later
    ctx, view, old_cfg = _bct(tmp_path, synthetic_tiny, stopped_old_run)
    method = BCT(ctx)
    rows, seen = method.old_head.weight.detach(), method.from_old_classifier
    old_labels = old_labels_of(view_classes(view), build_dataset(old_cfg.data))[seen.numpy()]
    paired, _ = ckpt.load_head_rows(epoch_end, old_labels)
    newer, _ = ckpt.load_head_rows(latest, old_labels)
    assert int(seen.sum()) == 9 and torch.equal(rows[seen], paired)
    assert not torch.equal(paired, newer)  # the data tell the two steps apart


def test_bct_refuses_when_no_checkpoint_holds_model_pts_step(tmp_path, synthetic_tiny, stopped_old_run):
    run = tmp_path / "old"
    shutil.copytree(stopped_old_run, run)
    epoch_end, latest = ckpt.list_checkpoints(run)
    shutil.rmtree(epoch_end)  # what the rotation (keep 2) does after one more mid-epoch checkpoint
    model_step = int(epoch_end.name.split("_")[1])
    ctx, _, _ = _bct(tmp_path, synthetic_tiny, run)
    with pytest.raises(ConfigError) as err:
        BCT(ctx)
    message = str(err.value)
    assert "\n" not in message and message.startswith("compat.old.checkpoint:")
    assert f"{run / 'model.pt'} (step {model_step}, the last epoch end)" in message
    assert f"{latest} (step {model_step + 1})" in message
