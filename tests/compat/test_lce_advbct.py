"""facecompat.compat.lce and facecompat.compat.advbct: each loss term against its formula, computed here
independently on hand-picked 4-d vectors, gradients included, plus gradient reversal and parameter checks.

The old-model artefacts come from a real, small :class:`FeatureBank` (``from_arrays``) whose features are
placed so that the class means are basis vectors and the angles known; the head is a real Partial FC.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecompat.compat.advbct import AdvBCT, adversarial_loss, chord, grl_ramp
from facecompat.compat.advbct import boundary_loss as adv_boundary_loss
from facecompat.compat.base import CompatContext
from facecompat.compat.lce import LCE, alignment_loss
from facecompat.compat.lce import boundary_loss as lce_boundary_loss
from facecompat.config import ConfigError
from facecompat.features import FeatureBank
from facecompat.heads import PartialFC

D = 4
E = np.eye(D)
# Dataset classes in the bank (ascending) and the view: view label k is dataset class LABEL_MAP[k].
BANK_CLASSES = np.array([2, 5, 7, 9], dtype=np.int64)
LABEL_MAP = np.array([9, 2, 5], dtype=np.int64)
VIEW_ROWS = np.array([3, 0, 1])  # view label -> class-stats row
# Per bank class: (centre axis, side axis, half-spread angle, with a record on the centre). Records at
# ±angle around the centre make the class mean exactly the centre axis.
LAYOUT = [(0, 1, 0.5, True), (1, 0, 0.0, None), (2, 3, 0.3, False), (3, 0, 0.6, True)]
# What the bank must find: class 2 -> e0 (angles 0.5, 0.5, 0), 5 -> e1 (one image), 7 -> e2, 9 -> e3.
WANT_MAX = np.array([0.5, 0.0, 0.3, 0.6])
WANT_MEAN = np.array([1 / 3, 0.0, 0.3, 0.4])
WANT_COUNT = np.array([3, 1, 2, 3])


def bank_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record ids (shuffled), dataset classes and features ``[N, 2, D]`` (flip = 2x the image's)."""
    labels, unit_vectors = [], []
    for cls, (axis, side, angle, centre) in zip(BANK_CLASSES, LAYOUT):
        if centre is None:
            vectors = [E[axis]]
        else:
            vectors = [math.cos(angle) * E[axis] + s * math.sin(angle) * E[side] for s in (1, -1)]
            vectors += [E[axis]] if centre else []
        labels += [cls] * len(vectors)
        unit_vectors += vectors
    u = np.stack(unit_vectors)
    ids = np.random.default_rng(0).permutation(len(u)) + 100
    return ids, np.array(labels, dtype=np.int64), np.stack([u, 2 * u], axis=1).astype(np.float16)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> FeatureBank:
    ids, labels, features = bank_arrays()
    out = FeatureBank.from_arrays(Path(tmp_path_factory.mktemp("bank")) / "bank", ids, labels, features,
                                  model={"name": "hand-made"})
    stats = out.class_stats()
    np.testing.assert_array_equal(stats.class_ids, BANK_CLASSES)
    np.testing.assert_allclose(stats.means, E, atol=1e-6)
    np.testing.assert_allclose(stats.angle_max, WANT_MAX, atol=2e-3)
    np.testing.assert_allclose(stats.angle_mean, WANT_MEAN, atol=2e-3)
    np.testing.assert_array_equal(stats.count, WANT_COUNT)
    # AdvBCT's centres: plain means of the unit image features; classes under 4 images are not
    # fenced, so each radius is the largest distance to that centre.
    unit_rows = features[:, 0].astype(np.float64)
    unit_rows /= np.linalg.norm(unit_rows, axis=1, keepdims=True)
    for row, cls in enumerate(BANK_CLASSES):
        members = unit_rows[labels == cls]
        np.testing.assert_allclose(stats.centres[row], members.mean(axis=0), atol=1e-6)
        want = np.linalg.norm(members - members.mean(axis=0), axis=1).max()
        assert stats.radius[row] == pytest.approx(want, abs=1e-6)
    assert 0 < np.linalg.norm(stats.centres[0]) < 0.95  # not renormalised
    return out


@pytest.fixture(scope="module")
def stats(bank: FeatureBank):
    return bank.class_stats()


def make_ctx(bank: FeatureBank, params: dict | None = None, weight: float = 1.0, *, rank: int = 0,
             world_size: int = 1, seed: int = 0) -> CompatContext:
    view = SimpleNamespace(labels=np.array([0, 1, 2, 0]), label_map=LABEL_MAP, num_classes=len(LABEL_MAP))
    head = PartialFC(D, len(LABEL_MAP), rank=rank, world_size=world_size)
    return CompatContext(params=params or {}, weight=weight, view=view, head=head, embedding_size=D,
                         rank=rank, world_size=world_size, seed=seed, bank=bank)


def record_ids(bank: FeatureBank, n: int = 4) -> np.ndarray:
    return np.asarray(bank.record_ids[:n])


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------- LCE

# Labels and embeddings: sample 0 sits on its centre (e3), 1 is 0.3 rad from e0 (inside 0.5),
# 2 is 1.0 rad from e1 (outside 0.8), 3 is at 90 degrees from e3 (outside), scaled arbitrarily.
LCE_LABELS = np.array([0, 1, 2, 0])
LCE_EMB = np.array([
    [0.0, 0.0, 0.0, 2.0],
    [math.cos(0.3), math.sin(0.3), 0.0, 0.0],
    [0.0, 3 * math.cos(1.0), 3 * math.sin(1.0), 0.0],
    [0.5, 0.0, 0.0, 0.0],
])


def lce_expected_boundary(stats, emb: np.ndarray, labels: np.ndarray, angles: np.ndarray) -> float:
    out = []
    for e, y in zip(emb, labels):
        centre = stats.means[VIEW_ROWS[y]]
        out.append(max(0.0, math.cos(angles[VIEW_ROWS[y]]) - float(unit(e) @ centre)))
    return float(np.mean(out))


def test_lce_batch_inputs_follow_label_map(bank, stats):
    method = LCE(make_ctx(bank))
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), LCE_LABELS)
    np.testing.assert_array_equal(inputs["centre"].numpy(), stats.means[VIEW_ROWS[LCE_LABELS]])
    np.testing.assert_allclose(inputs["boundary_cos"].numpy(), np.cos(stats.angle_max[VIEW_ROWS[LCE_LABELS]]),
                               rtol=1e-6)
    assert inputs["centre"].dtype == torch.float32 and inputs["boundary_cos"].dtype == torch.float32


@pytest.mark.parametrize("boundary, scale", [("max", 1.0), ("mean", 1.0), ("max", 1.5)])
def test_lce_boundary_term_matches_formula(bank, stats, boundary: str, scale: float):
    params = {"boundary": boundary, "boundary_scale": scale, "boundary_weight": 3.0}
    method = LCE(make_ctx(bank, params, weight=0.5))
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), LCE_LABELS)
    emb = torch.tensor(LCE_EMB, dtype=torch.float32, requires_grad=True)
    out = method(emb, torch.from_numpy(LCE_LABELS), inputs)
    assert out.embeddings is emb and set(out.terms) == {"lce_align", "lce_boundary"}
    angles = (stats.angle_max if boundary == "max" else stats.angle_mean) * scale
    expected = lce_expected_boundary(stats, LCE_EMB, LCE_LABELS, angles)
    assert expected > 0
    assert out.terms["lce_boundary"].item() == pytest.approx(0.5 * 3.0 * expected, rel=1e-5)

    # Analytic gradient: active samples get -(λ w / b) (m − (ê·m) ê) / ‖e‖, the others none.
    out.terms["lce_boundary"].backward()
    grad = np.zeros_like(LCE_EMB)
    for i, (e, y) in enumerate(zip(LCE_EMB, LCE_LABELS)):
        m = stats.means[VIEW_ROWS[y]].astype(np.float64)
        u = unit(e)
        if math.cos(angles[VIEW_ROWS[y]]) - u @ m > 0:
            grad[i] = -(0.5 * 3.0 / len(LCE_LABELS)) * (m - (u @ m) * u) / np.linalg.norm(e)
    active = [i for i in range(4) if np.any(grad[i] != 0)]
    assert 0 < len(active) < 4
    np.testing.assert_allclose(emb.grad.numpy(), grad, atol=1e-6)


def test_lce_boundary_gradcheck():
    emb = torch.tensor(LCE_EMB, dtype=torch.float64, requires_grad=True)
    centres = torch.tensor(E[VIEW_ROWS[LCE_LABELS]], dtype=torch.float64)
    bcos = torch.tensor(np.cos(WANT_MAX[VIEW_ROWS[LCE_LABELS]]), dtype=torch.float64)
    # Move sample 0 off its centre so that no sample sits on a kink of the hinge.
    with torch.no_grad():
        emb[0, 0] = 0.3
    assert torch.autograd.gradcheck(lambda e: lce_boundary_loss(e, centres, bcos), (emb,))


def test_lce_align_term_matches_formula_and_touches_only_the_head(bank, stats):
    method = LCE(make_ctx(bank, {"align_weight": 2.0}, weight=0.5))
    head = method.ctx.head
    rows = np.array([[1.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rows))
    emb = torch.tensor(LCE_EMB, dtype=torch.float32, requires_grad=True)
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), LCE_LABELS)
    out = method(emb, torch.from_numpy(LCE_LABELS), inputs)
    centres = stats.means[VIEW_ROWS]  # view class c -> its old centre
    expected = np.mean([1 - unit(w) @ m for w, m in zip(rows, centres)])
    assert out.terms["lce_align"].item() == pytest.approx(0.5 * 2.0 * expected, rel=1e-6)

    out.terms["lce_align"].backward()
    assert emb.grad is None
    want = np.stack([-(m - (unit(w) @ m) * unit(w)) / np.linalg.norm(w) for w, m in zip(rows, centres)])
    np.testing.assert_allclose(head.weight.grad.numpy(), 0.5 * 2.0 * want / 3, atol=1e-6)
    # Row 1 equals its centre up to scale: no gradient.
    assert torch.all(head.weight.grad[1] == 0)


def test_lce_align_gradcheck():
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0], [2.0, 0.1, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    centres = torch.tensor(E[:2], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: alignment_loss(x, centres, 5), (w,))


def test_lce_align_shards_sum_to_the_global_mean(bank, stats):
    rows = torch.tensor([[1.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    full = LCE(make_ctx(bank))
    with torch.no_grad():
        full.ctx.head.weight.copy_(rows)
    emb = torch.tensor(LCE_EMB, dtype=torch.float32)
    inputs = full.batch_inputs(record_ids(bank), np.zeros(4, bool), LCE_LABELS)
    total = full(emb, torch.from_numpy(LCE_LABELS), inputs).terms["lce_align"].item()
    parts = []
    for rank in range(2):
        method = LCE(make_ctx(bank, rank=rank, world_size=2))
        head = method.ctx.head
        shard = slice(head.class_start, head.class_start + head.num_local)
        np.testing.assert_array_equal(method.shard_centres.numpy(), stats.means[VIEW_ROWS[shard]])
        with torch.no_grad():
            head.weight.copy_(rows[shard])
        parts.append(method(emb, torch.from_numpy(LCE_LABELS), inputs).terms["lce_align"].item())
    assert sum(parts) == pytest.approx(total, rel=1e-6)
    assert all(p > 0 for p in parts)


def test_lce_zero_on_old_centres_and_inside_boundary(bank, stats):
    method = LCE(make_ctx(bank))
    with torch.no_grad():
        method.ctx.head.weight.copy_(torch.tensor(stats.means[VIEW_ROWS]) * 3.0)
    labels = np.array([0, 1, 2, 1])
    inside = [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [math.cos(0.4), 0, math.sin(0.4), 0]]  # 0.4 < 0.5
    emb = torch.tensor(inside, dtype=torch.float32, requires_grad=True)
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), labels)
    out = method(emb, torch.from_numpy(labels), inputs)
    assert out.terms["lce_align"].item() == pytest.approx(0.0, abs=1e-7)
    assert out.terms["lce_boundary"].item() == 0.0
    sum(out.terms.values()).backward()
    assert torch.all(emb.grad == 0)


# ------------------------------------------------------------------------------------------- AdvBCT

ADV_LABELS = np.array([0, 2, 1, 0])  # view label 2 = class 5 has one image: no boundary
# Sample 0: 1.0 rad from e3 (0.909 from class 9's centre 0.884·e3, radius 0.568); sample 1: 90 degrees
# from e1 but without a boundary; sample 2: on e0; sample 3: 0.2 rad from e3. Only sample 0 counts.
ADV_EMB = np.array([
    [math.sin(1.0), 0.0, 0.0, math.cos(1.0)],
    [0.0, 0.0, 1.0, 0.0],
    [2.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.5 * math.sin(0.2), 0.5 * math.cos(0.2)],
])


def adv_expected_boundary(stats, emb: np.ndarray, labels: np.ndarray, radius: np.ndarray) -> float:
    """Mean of the hinge over the violating samples of classes with two or more images, distances to
    the (unnormalised) boundary centres."""
    excess = []
    for e, y, r in zip(emb, labels, radius):
        if stats.count[VIEW_ROWS[y]] < 2:
            continue
        d = np.linalg.norm(unit(e) - stats.centres[VIEW_ROWS[y]])
        if d > r:
            excess.append(d - r)
    return float(np.mean(excess)) if excess else 0.0


def test_advbct_batch_inputs(bank, stats):
    method = AdvBCT(make_ctx(bank))
    all_ids, _, features = bank_arrays()
    pick, flipped = np.array([3, 0, 2, 0]), np.array([True, False, False, True])
    inputs = method.batch_inputs(all_ids[pick], flipped, ADV_LABELS)
    want_old = features[pick, flipped.astype(int)].astype(np.float32)
    np.testing.assert_array_equal(inputs["old"].numpy(), want_old)
    assert inputs["old"][0].norm() > 1.5 and inputs["old"][1].norm() < 1.01  # the flip is stored at 2x
    np.testing.assert_array_equal(inputs["centre"].numpy(), stats.centres[VIEW_ROWS[ADV_LABELS]])
    np.testing.assert_array_equal(inputs["radius"].numpy(), stats.radius[VIEW_ROWS[ADV_LABELS]])
    np.testing.assert_array_equal(inputs["valid"].numpy(), [True, False, True, True])
    assert stats.count[VIEW_ROWS[2]] == 1


def test_advbct_fixed_boundary_matches_formula(bank, stats):
    method = AdvBCT(make_ctx(bank, {"elastic": False, "boundary_weight": 2.0}, weight=0.5))
    assert not hasattr(method, "boundary_logit")
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), ADV_LABELS)
    emb = torch.tensor(ADV_EMB, dtype=torch.float32, requires_grad=True)
    out = method(emb, torch.from_numpy(ADV_LABELS), inputs)
    radius = stats.radius[VIEW_ROWS[ADV_LABELS]].astype(np.float64)
    expected = adv_expected_boundary(stats, ADV_EMB, ADV_LABELS, radius)
    assert expected > 0
    assert out.terms["advbct_boundary"].item() == pytest.approx(0.5 * 2.0 * expected, rel=1e-5)
    # Only sample 0 violates: the gradient is λ w ∂‖ê − m‖/∂e on it (mean over one violator).
    out.terms["advbct_boundary"].backward()
    u, m = unit(ADV_EMB[0]), stats.centres[3].astype(np.float64)
    diff = u - m
    g_u = diff / np.linalg.norm(diff)
    want = (g_u - (g_u @ u) * u) / np.linalg.norm(ADV_EMB[0])
    np.testing.assert_allclose(emb.grad[0].numpy(), want, atol=1e-6)
    assert torch.all(emb.grad[1:] == 0)


def test_advbct_elastic_radius_and_its_gradient(bank, stats):
    method = AdvBCT(make_ctx(bank, {"threshold": 1.2}))
    logit = method.boundary_logit.detach().numpy().astype(np.float64)
    assert logit.shape == (3,) and np.all(np.abs(logit) <= 1)
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), ADV_LABELS)
    emb = torch.tensor(ADV_EMB, dtype=torch.float32, requires_grad=True)
    out = method(emb, torch.from_numpy(ADV_LABELS), inputs)
    r = stats.radius[VIEW_ROWS[ADV_LABELS]].astype(np.float64)
    sig = 1 / (1 + np.exp(-logit[ADV_LABELS]))
    rho = r + sig * (1.2 - r)
    expected = adv_expected_boundary(stats, ADV_EMB, ADV_LABELS, rho)
    assert expected > 0  # sample 0 (0.909 from its centre) is still outside rho_0 < 1.2
    assert out.terms["advbct_boundary"].item() == pytest.approx(expected, rel=1e-5)
    out.terms["advbct_boundary"].backward()
    # d/dw_0 of (d − ρ) = −σ'(w_0)(T − r_0); view classes 1, 2 get nothing (no boundary / inside).
    s0 = 1 / (1 + np.exp(-logit[0]))
    want = np.array([-s0 * (1 - s0) * (1.2 - r[0]), 0.0, 0.0])
    np.testing.assert_allclose(method.boundary_logit.grad.numpy(), want, atol=1e-6)


def test_advbct_boundary_gradcheck():
    emb = torch.tensor(ADV_EMB, dtype=torch.float64, requires_grad=True)
    centres = torch.tensor(E[VIEW_ROWS[ADV_LABELS]], dtype=torch.float64)
    radius = torch.tensor([0.3, 0.2, 0.4, 0.1], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, False, True, True])
    with torch.no_grad():
        emb[2, 0] = 0.5  # move off the centre (the distance's kink)
    assert torch.autograd.gradcheck(lambda e, r: adv_boundary_loss(e, centres, r, valid), (emb, radius))


def test_advbct_zero_inside_the_boundary(bank, stats):
    method = AdvBCT(make_ctx(bank))
    labels = np.array([0, 1, 2, 1])
    emb = torch.tensor(stats.means[VIEW_ROWS[labels]] * 2.0, requires_grad=True)
    with torch.no_grad():
        emb[3] = torch.tensor([1.0, 0.1, 0.0, 0.0])  # 0.1 rad from e0 (view label 1), inside
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), labels)
    out = method(emb, torch.from_numpy(labels), inputs)
    assert out.terms["advbct_boundary"].item() == 0.0
    out.terms["advbct_boundary"].backward()
    assert torch.all(emb.grad == 0) and torch.all(method.boundary_logit.grad == 0)


def plain_bce(disc: torch.nn.Module, emb: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss written out without gradient reversal."""
    logits = disc(torch.cat([F.normalize(emb, dim=1), F.normalize(old, dim=1)])).squeeze(1)
    b = emb.shape[0]
    return (F.binary_cross_entropy_with_logits(logits[:b], torch.zeros(b))
            + F.binary_cross_entropy_with_logits(logits[b:], torch.ones(b)))


def test_advbct_gradient_reversal(bank):
    method = AdvBCT(make_ctx(bank, {"grl_factor": 0.5, "adv_weight": 2.0, "schedule": "constant"},
                             weight=1.5))
    method.set_progress(0.9)  # a constant schedule ignores progress
    disc = method.discriminator
    flipped = np.array([False, True, False, True])
    inputs = method.batch_inputs(record_ids(bank), flipped, ADV_LABELS)
    emb = torch.tensor(ADV_EMB, dtype=torch.float32, requires_grad=True)
    out = method(emb, torch.from_numpy(ADV_LABELS), inputs)
    bce = plain_bce(disc, emb.detach(), inputs["old"]).item()
    assert out.terms["advbct_adv"].item() == pytest.approx(1.5 * 2.0 * bce, rel=1e-5)

    out.terms["advbct_adv"].backward()
    emb_grad = emb.grad.clone()
    disc_grads = [p.grad.clone() for p in disc.parameters()]
    # The same loss without reversal: D's gradients agree, the embedding's is −grl_factor times it.
    disc.zero_grad()
    emb.grad = None
    (1.5 * 2.0 * plain_bce(disc, emb, inputs["old"])).backward()
    np.testing.assert_allclose(emb_grad.numpy(), -0.5 * emb.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert emb_grad.abs().sum() > 0
    for got, want in zip(disc_grads, (p.grad for p in disc.parameters())):
        torch.testing.assert_close(got, want)

    # A descent step on D lowers its loss; a descent step on the embeddings raises it (fools D).
    with torch.no_grad():
        for p, g in zip(disc.parameters(), disc_grads):
            p -= 0.05 * g
        assert plain_bce(disc, emb, inputs["old"]).item() < bce
        for p, g in zip(disc.parameters(), disc_grads):
            p += 0.05 * g
        assert plain_bce(disc, emb - 0.05 * emb_grad, inputs["old"]).item() > bce


def test_advbct_ramp_schedule(bank):
    """Default schedule: reversal factor 2/(1+e^(-10p))-1 and adversarial weight (1-p)."""
    method = AdvBCT(make_ctx(bank, {"grl_factor": 0.5, "adv_weight": 2.0}))
    assert method.adversarial_schedule() == (0.0, 2.0)  # before the first step: no reversal yet
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), ADV_LABELS)
    emb = torch.tensor(ADV_EMB, dtype=torch.float32, requires_grad=True)
    out = method(emb, torch.from_numpy(ADV_LABELS), inputs)
    out.terms["advbct_adv"].backward()
    assert torch.all(emb.grad == 0)  # D learns, the backbone gets nothing at p = 0
    assert method.discriminator[0].weight.grad.abs().sum() > 0

    method.set_progress(0.25)
    grl, weight = method.adversarial_schedule()
    assert grl == pytest.approx(0.5 * (2 / (1 + math.exp(-2.5)) - 1))
    assert weight == pytest.approx(2.0 * 0.75)
    emb.grad = None
    method.discriminator.zero_grad()
    out = method(emb, torch.from_numpy(ADV_LABELS), inputs)
    assert out.terms["advbct_adv"].item() == pytest.approx(
        1.5 * plain_bce(method.discriminator, emb.detach(), inputs["old"]).item(), rel=1e-5)
    out.terms["advbct_adv"].backward()
    got = emb.grad.clone()
    emb.grad = None
    (1.5 * plain_bce(method.discriminator, emb, inputs["old"])).backward()
    np.testing.assert_allclose(got.numpy(), -grl * emb.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert grl_ramp(1.0) == pytest.approx(1.0, abs=1e-4) and grl_ramp(0.0) == 0.0


def test_advbct_mean_radius(bank, stats):
    method = AdvBCT(make_ctx(bank, {"radius": "mean"}))
    inputs = method.batch_inputs(record_ids(bank), np.zeros(4, bool), ADV_LABELS)
    want = 2 * np.sin(stats.angle_mean[VIEW_ROWS[ADV_LABELS]] / 2)
    np.testing.assert_allclose(inputs["radius"].numpy(), want, rtol=1e-6)
    np.testing.assert_array_equal(inputs["centre"].numpy(), stats.means[VIEW_ROWS[ADV_LABELS]])  # unit
    valid = inputs["valid"].numpy()
    assert np.all(want[valid] < 2 * np.sin(stats.angle_max[VIEW_ROWS[ADV_LABELS]] / 2)[valid] + 1e-9)


def test_advbct_discriminator_same_on_every_rank_and_leaves_global_rng(bank):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    ranks = [AdvBCT(make_ctx(bank, rank=r, world_size=2, seed=7)) for r in range(2)]
    torch.testing.assert_close(torch.rand(3), expected_draw)
    first, second = (m.state_dict() for m in ranks)
    assert set(first) == set(second) and "boundary_logit" in first
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    other = AdvBCT(make_ctx(bank, seed=8)).state_dict()
    assert not torch.equal(other["discriminator.0.weight"], first["discriminator.0.weight"])
    assert first["discriminator.0.weight"].shape == (100, D)  # the reference's 100 hidden units
    assert sum(p.numel() for p in ranks[0].parameters()) == D * 100 + 100 + 2 * 100 + 100 + 1 + 3


def test_adversarial_loss_uses_unit_vectors(bank):
    method = AdvBCT(make_ctx(bank, {"disc_hidden": 8}))
    emb = torch.tensor(ADV_EMB, dtype=torch.float32)
    old = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    a = adversarial_loss(method.discriminator, emb, old, 1.0)
    b = adversarial_loss(method.discriminator, emb * 3.0, old * 0.2, 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_chord():
    np.testing.assert_allclose(chord(np.array([0.0, math.pi / 3, math.pi])), [0.0, 1.0, 2.0], atol=1e-12)


# ------------------------------------------------------------------------------------------- params

@pytest.mark.parametrize("cls, key, value", [
    (LCE, "align_weight", -1.0),
    (LCE, "boundary_weight", -0.5),
    (LCE, "boundary_scale", 0.0),
    (LCE, "boundary", "median"),
    (AdvBCT, "adv_weight", -1.0),
    (AdvBCT, "grl_factor", -0.1),
    (AdvBCT, "disc_hidden", 0),
    (AdvBCT, "threshold", 2.5),
    (AdvBCT, "boundary_weight", -2.0),
    (AdvBCT, "radius", "median"),
    (AdvBCT, "radius", "max"),  # the largest angle over every image: replaced by the reference's
    (AdvBCT, "schedule", "cosine"),
])
def test_out_of_range_parameter(bank, cls, key: str, value):
    with pytest.raises(ConfigError, match=rf"^compat\.params\.{key}:"):
        cls(make_ctx(bank, {key: value}))


@pytest.mark.parametrize("cls", [LCE, AdvBCT])
def test_unknown_parameter(bank, cls):
    with pytest.raises(ConfigError, match=r"^compat\.params\.margin: not a parameter"):
        cls(make_ctx(bank, {"margin": 0.1}))


def test_wrong_type_parameter(bank):
    with pytest.raises(ConfigError, match=r"^compat\.params\.elastic:"):
        AdvBCT(make_ctx(bank, {"elastic": 1}))
