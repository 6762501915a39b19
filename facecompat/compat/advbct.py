"""AdvBCT: an elastic boundary around the old classes plus adversarial alignment (Pan et al., CVPR 2023).

Two terms on top of the new model's ArcFace loss, with φ̂ the L2-normalised embedding and c_c the
old centre of class c (from the bank's :class:`~facecompat.features.ClassStats`):

- elastic boundary: the old radius r_c of class c is the reference's (``radius: tukey``, the
  default; ``gen_class_meta`` of ``Ashespt/AdvBCT``, also in MixBCT's face reproduction): each old
  feature is L2-normalised (``v = normalize(f)``, the un-flipped image's feature; the reference
  extracts one view per image), the centre c_c is the plain mean of the class's ``v``, NOT
  renormalised, and r_c is the largest ``‖v − c_c‖`` inside the Tukey fences of the class's
  distances (1.5·IQR on both sides, quartiles as the reference indexes them, classes under 4
  images unfenced; :func:`~facecompat.features.fenced_max`): one or two mislabelled images no
  longer set the radius. The boundary's distance ``‖φ̂_new − c_c‖`` is to that same unnormalised
  centre, as the reference's loss computes it, so radius and distance are on one scale (a unit
  vector against a point inside the unit ball). Its elastic radius moves r_c towards a threshold
  T by a learnable share: ``ρ_c = r_c + σ(w_c) · (T − r_c)`` (w_c one trainable scalar per class,
  initialised U(−1, 1)). Per sample ``e_i = relu(‖φ̂_new(x_i) − c_{y_i}‖ − ρ_{y_i})`` and the term
  is the mean of e_i over the samples that violate their boundary (e_i > 0; zero when none does).
  Classes whose old statistics come from fewer than two images carry no boundary and are skipped
  (the reference skips a class whose kept distances number one or none). A class id without any
  image (a gap in the labels of a view that does not relabel) is never a label: it gets count 0,
  radius 0 and no boundary as placeholders, and its w_c never receives a gradient.
- adversarial: a discriminator D (Linear D→h, BatchNorm, ReLU, Linear h→1) tells old features
  (the bank's feature of the same image and flip, normalised; label 1) from new embeddings
  (normalised, label 0). New embeddings reach D through a gradient-reversal layer, so minimising
  the total loss trains D to separate the two while the backbone learns to make them
  indistinguishable: ``adv = BCE(D(GRL(φ̂_new)), 0) + BCE(D(φ̂_old), 1)`` (each a mean over this
  rank's samples).

Terms: ``advbct_boundary = λ · boundary_weight · boundary`` and ``advbct_adv = λ · adv_weight · adv``.
D and the w_c are ordinary trainable submodules: the trainer optimises them (gradients averaged over
ranks); they are initialised from ``train.seed`` alone, so every rank starts identical.

Checked against the public implementation (``Ashespt/AdvBCT``: ``trainer/trainer.py``
``bct_limit`` with ``ELASTIC_BOUNDARY``, ``models/modules.py`` ``ElasticBoundary``,
``models/base_model.py``), whose boundary is written as ``r ± |r − T| σ(w)`` (+ below T, − above),
the same as ρ_c above; default T = 1.0. Differences:

- the reference's discriminator has 100 hidden units and two log-softmax outputs (NLL, new = 0,
  old = 1); one logit with BCE is the same model family. Default ``disc_hidden`` follows it (100).
- the reference feeds D the unnormalised (BatchNorm) features and runs it on the new and the old
  batch in two calls (so its BatchNorm standardises each domain separately, hiding a mean shift
  between them); here D sees unit vectors and one joint batch of new and old rows.
- the reference ramps the reversal factor as ``2 / (1 + exp(−10 p)) − 1`` (p = training progress)
  and weights the adversarial loss by ``(E − e + 1) / E`` (epoch e of E). ``schedule: ramp`` (the
  default) does the same from the trainer's progress, the weight decaying continuously as
  ``1 − p``; ``schedule: constant`` keeps ``grl_factor`` and ``adv_weight`` as given.
- ``radius: mean`` (ours, not the reference's) uses the unit class mean m_c of the fused
  (image + flip) old features as centre and the chord ``2 sin(θmean_c / 2)`` of the class's mean
  angle to it as radius: a tighter cone, for data where the old classes are wide enough that new
  features satisfy the reference's radius untrained (``configs/synthetic_advbct.yaml``).
- MixBCT's face reproduction of AdvBCT multiplies the boundary term by 4 and uses T = 0.4
  (``configs/ms1mv3_advbct.yaml`` takes its T).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecompat.compat.base import CompatContext, CompatMethod, CompatOutput, param_error
from facecompat.compat.lce import take_class_rows, view_class_rows
from facecompat.compat.registry import register_method
from facecompat.heads.grad import grad_reverse

_STREAM = 0xAD7B_C7E1


def chord(angle: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors ``angle`` radians apart: ``2 sin(angle / 2)``."""
    return 2.0 * np.sin(np.clip(angle, 0.0, math.pi) / 2.0)


def elastic_radius(radius: Tensor, logit: Tensor, threshold: float) -> Tensor:
    """``radius + sigmoid(logit) · (threshold − radius)``: the old radius moved towards the threshold."""
    return radius + torch.sigmoid(logit) * (threshold - radius)


def boundary_loss(emb: Tensor, centres: Tensor, radius: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``relu(‖normalize(emb_i) − centres_i‖ − radius_i)`` over the violating valid samples.

    Args:
        emb: ``[b, D]`` new embeddings; centres: ``[b, D]`` old class centres of their labels (as
            the radius was measured from: unnormalised means for ``radius: tukey``, unit for ``mean``);
        radius: ``[b]`` each sample's boundary radius; valid: bool ``[b]`` samples with a boundary.
    Returns:
        A scalar; 0 when no valid sample lies outside its boundary.
    """
    dist = (F.normalize(emb, dim=1) - centres.to(emb.dtype)).norm(dim=1)
    excess = F.relu(dist - radius.to(emb.dtype)) * valid.to(emb.dtype)
    # The count is a tensor: no host synchronisation.
    return excess.sum() / (excess > 0).sum().clamp_min(1)


def build_discriminator(embedding_size: int, hidden: int, seed: int, device: torch.device) -> nn.Sequential:
    """Linear(D, h) - BatchNorm1d(h) - ReLU - Linear(h, 1), drawn from a local generator seeded with
    ``seed`` (PyTorch's default Linear ranges, ``U(±1/sqrt(fan_in))``), not from the global stream."""
    disc = nn.Sequential(
        nn.utils.skip_init(nn.Linear, embedding_size, hidden, device=device),
        nn.BatchNorm1d(hidden, device=device),
        nn.ReLU(inplace=True),
        nn.utils.skip_init(nn.Linear, hidden, 1, device=device),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (disc[0], disc[3]):
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=gen).mul_(2 * bound).sub_(bound))
    return disc


def grl_ramp(progress: float) -> float:
    """The reversal factor's ramp of domain-adversarial training, ``2 / (1 + exp(−10 p)) − 1``:
    0 at the start, 0.987 at half of training, 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def adversarial_loss(disc: nn.Module, emb: Tensor, old: Tensor, grl_factor: float) -> Tensor:
    """``BCE(D(GRL(normalize(emb))), 0) + BCE(D(normalize(old)), 1)``, one joint batch through D."""
    b = emb.shape[0]
    new_unit = grad_reverse(F.normalize(emb, dim=1), grl_factor)
    old_unit = F.normalize(old.to(emb.dtype), dim=1)
    logits = disc(torch.cat([new_unit, old_unit])).squeeze(1)
    return (F.binary_cross_entropy_with_logits(logits[:b], torch.zeros_like(logits[:b]))
            + F.binary_cross_entropy_with_logits(logits[b:], torch.ones_like(logits[b:])))


@register_method
class AdvBCT(CompatMethod):
    """Params: ``boundary_weight`` (1.0), ``adv_weight`` (1.0), ``grl_factor`` (1.0), ``disc_hidden``
    (100), ``threshold`` (T of the elastic radius, 1.0), ``elastic`` (learn the radius, true; false:
    the old radius as is), ``radius`` (``tukey``: the reference's, default; ``mean``: chord of the
    class's mean angle around its unit mean), ``schedule`` (``ramp``: reversal factor and
    adversarial weight follow training progress; ``constant``)."""

    name = "advbct"
    needs = frozenset({"bank", "class_stats"})
    defaults = {"boundary_weight": 1.0, "adv_weight": 1.0, "grl_factor": 1.0, "disc_hidden": 100,
                "threshold": 1.0, "elastic": True, "radius": "tukey", "schedule": "ramp"}

    def __init__(self, ctx: CompatContext):
        super().__init__(ctx)
        p = self.params
        for key in ("boundary_weight", "adv_weight", "grl_factor"):
            if p[key] < 0.0:
                raise param_error(key, p[key], "must be >= 0")
        if p["disc_hidden"] < 1:
            raise param_error("disc_hidden", p["disc_hidden"], "must be >= 1")
        if not 0.0 <= p["threshold"] <= 2.0:
            raise param_error("threshold", p["threshold"], "must be in [0, 2] (distances of unit vectors)")
        self.boundary_weight, self.adv_weight = float(p["boundary_weight"]), float(p["adv_weight"])
        self.grl_factor, self.threshold = float(p["grl_factor"]), float(p["threshold"])
        self.elastic = bool(p["elastic"])
        if p["radius"] not in ("tukey", "mean"):
            raise param_error("radius", p["radius"], "must be tukey (the reference's) or mean")
        if p["schedule"] not in ("ramp", "constant"):
            raise param_error("schedule", p["schedule"], "must be ramp or constant")
        self.schedule = p["schedule"]
        self.progress = 0.0
        self.bank = ctx.bank
        self.stats = ctx.bank.class_stats()
        self.rows = view_class_rows(ctx)  # view label -> class-stats row
        if p["radius"] == "tukey":
            self.centres = np.asarray(self.stats.centres)
            self.radius = take_class_rows(np.asarray(self.stats.radius), self.rows).astype(np.float32)
        else:
            self.centres = np.asarray(self.stats.means)
            angle = take_class_rows(np.asarray(self.stats.angle_mean), self.rows).astype(np.float64)
            self.radius = chord(angle).astype(np.float32)
        # a class id without images (row -1, never a label) has count 0: no boundary, radius 0
        self.has_boundary = take_class_rows(np.asarray(self.stats.count), self.rows) >= 2

        seed = (int(ctx.seed) * 1_000_003 + _STREAM) % (2**63)  # the same on every rank
        self.discriminator = build_discriminator(ctx.embedding_size, p["disc_hidden"], seed, ctx.device)
        if self.elastic:  # one trainable scalar per view class, U(-1, 1) as the reference
            gen = torch.Generator().manual_seed(seed + 1)
            logit = torch.rand(len(self.rows), generator=gen).mul_(2.0).sub_(1.0)
            self.boundary_logit = nn.Parameter(logit.to(ctx.device))

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)

    def adversarial_schedule(self) -> tuple[float, float]:
        """(reversal factor, adversarial weight) at the current progress."""
        if self.schedule == "constant":
            return self.grl_factor, self.adv_weight
        p = self.progress
        return self.grl_factor * grl_ramp(p), self.adv_weight * max(1.0 - p, 0.0)

    def batch_inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                     labels: np.ndarray) -> dict[str, Tensor]:
        centres = np.asarray(self.centres[self.rows[labels]], dtype=np.float32)
        return {"old": torch.from_numpy(self.bank.lookup(record_ids, flipped)),
                "centre": torch.from_numpy(centres),
                "radius": torch.from_numpy(self.radius[labels]),
                "valid": torch.from_numpy(self.has_boundary[labels])}

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        radius = inputs["radius"]
        if self.elastic:
            radius = elastic_radius(radius, self.boundary_logit[labels], self.threshold)
        bound = boundary_loss(emb, inputs["centre"], radius, inputs["valid"])
        grl_factor, adv_weight = self.adversarial_schedule()
        adv = adversarial_loss(self.discriminator, emb, inputs["old"], grl_factor)
        terms = {"advbct_boundary": (self.weight * self.boundary_weight) * bound,
                 "advbct_adv": (self.weight * adv_weight) * adv}
        return CompatOutput(emb, labels, terms)
