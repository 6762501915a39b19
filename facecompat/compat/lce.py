"""LCE: aligned class centres and a boundary loss around the old classes (Meng et al., ICCV 2021).

For equal old and new dimensions (no transformation module) LCE adds two terms to the new model's
ArcFace loss, both against the old model's class centres m_c (L2-normalised means of the old
features of each class, from the bank):

- alignment: ``align = (1/C) · Σ_{c in shard} (1 − cos(w_c, m_c))`` over this rank's rows w_c of the
  new Partial FC head (C = all classes of the head). The head's rows are rank-local parameters (DDP
  does not average them), so each rank returns the part of the global mean that its shard owns:
  every row gets the gradient of the global mean whatever the world size. The returned value is
  the global mean on every rank (the other shards' shares are added as a constant, after one
  scalar all-reduce), so that it is logged and checked like the other terms.
- boundary: ``boundary = mean_i relu(cos b_{y_i} − cos(φ_new(x_i), m_{y_i}))`` over this rank's
  samples, where b_c is the old class's boundary angle (``boundary: max`` — the largest angle
  between an old feature of the class and m_c — or ``mean``), times ``boundary_scale``.
  A new embedding inside the old class's cone costs nothing; outside it, the cosine gap.

Terms: ``lce_align = λ · align_weight · align`` and ``lce_boundary = λ · boundary_weight · boundary``.

Checked against the public implementation (``IrvingMeng/LCE``, ``main.py``), with these differences:

- the reference's alignment is ``mse_loss(normalize(W), M)``, the mean over all C·D elements of
  ``(ŵ − m)²``, which equals ``(2/D) · mean_c (1 − cos(w_c, m_c))``; its default λ_a = 100 therefore
  corresponds to ``align_weight = 200 / D`` here (0.39 for D = 512). We use the scale-free form.
- the reference's boundary is the same cosine-space hinge, ``mean relu(cos_min_c − f·m_c)`` with
  cos_min_c the smallest cosine of a class's old features to m_c (= ``cos(angle_max)``), but on the
  unnormalised feature f clamped to [−1, 1]; we normalise φ_new, as the paper's definition does.
  (AdvBCT's re-implementation of LCE uses the angle, ``relu(acos(f̂·m) − θ_c)``, instead.)
- the reference's old features are ``normalize(f_img + f_flip)``; the bank fuses
  ``normalize(normalize(f_img) + normalize(f_flip))`` (the same direction up to the two norms).
- as in the reference, a class with a single old image has boundary angle 0: its samples are
  pulled all the way onto the old centre.

A class id of the view without any image (a gap in the dataset's labels, kept by views that do
not relabel: OPdata, EXclass/EXdata's new part) has no old features. It is never a label, so it
gets placeholders (:func:`view_class_rows` gives it row -1; its centre is a zero vector, its
boundary angle 0) and no alignment term: its head row is left out of the alignment mean, which is
taken over the classes that have a centre.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecompat import dist
from facecompat.compat.base import CompatContext, CompatMethod, CompatOutput, param_error
from facecompat.compat.registry import register_method

BOUNDARIES = ("max", "mean")


def view_class_rows(ctx: CompatContext) -> np.ndarray:
    """int64 ``[num_view_classes]``: the class-stats row of each view label (via the view's label
    map); -1 for a class id with no record in the bank (no image in the view: never a label)."""
    view = ctx.view
    classes = view.label_map if view.label_map is not None else np.arange(view.num_classes)
    return np.asarray(ctx.bank.class_rows(np.asarray(classes, dtype=np.int64), missing=-1), dtype=np.int64)


def take_class_rows(values: np.ndarray, rows: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """``values[rows]`` (a per-class statistic) with ``fill`` where ``rows`` is -1 (no record)."""
    known = rows >= 0
    out = np.full((len(rows), *np.shape(values)[1:]), fill, dtype=np.asarray(values[:0]).dtype)
    out[known] = values[rows[known]]
    return out


def shard_centres(ctx: CompatContext, stats, rows: np.ndarray) -> Tensor:
    """``[num_local, D]`` float32 old class means of this rank's head shard, on ``ctx.device``
    (zero rows for classes without a record)."""
    head = ctx.head
    if head.num_classes != len(rows):
        raise ValueError(f"the head has {head.num_classes} classes but the view {len(rows)}")
    shard = rows[head.class_start : head.class_start + head.num_local]
    return torch.from_numpy(take_class_rows(stats.means, shard).astype(np.float32)).to(ctx.device)


def alignment_loss(weight: Tensor, centres: Tensor, num_classes: int) -> Tensor:
    """``Σ_c (1 − cos(weight_c, centres_c)) / num_classes``: this shard's share of the global mean.

    Args:
        weight: ``[n, D]`` the head's rows of this shard; centres: ``[n, D]`` unit old class means.
        num_classes: C, all classes over all shards.
    """
    if weight.shape[0] == 0:
        return weight.sum() * 0.0
    cos = (F.normalize(weight, dim=1) * centres.to(weight.dtype)).sum(dim=1)
    return (1.0 - cos).sum() / num_classes


def boundary_loss(emb: Tensor, centres: Tensor, boundary_cos: Tensor) -> Tensor:
    """``mean_i relu(boundary_cos_i − cos(emb_i, centres_i))``.

    Args:
        emb: ``[b, D]`` new embeddings (unnormalised); centres: ``[b, D]`` unit old class means of
            their labels; boundary_cos: ``[b]`` cosine of each label's boundary angle.
    """
    cos = (F.normalize(emb, dim=1) * centres.to(emb.dtype)).sum(dim=1)
    return F.relu(boundary_cos.to(emb.dtype) - cos).mean()


@register_method
class LCE(CompatMethod):
    """Params: ``align_weight`` (1.0), ``boundary_weight`` (1.0), ``boundary`` (``max`` or ``mean``
    angle of the old class, ``max``), ``boundary_scale`` (factor on that angle, 1.0)."""

    name = "lce"
    needs = frozenset({"bank", "class_stats"})
    defaults = {"align_weight": 1.0, "boundary_weight": 1.0, "boundary": "max", "boundary_scale": 1.0}

    def __init__(self, ctx: CompatContext):
        super().__init__(ctx)
        p = self.params
        for key in ("align_weight", "boundary_weight"):
            if p[key] < 0.0:
                raise param_error(key, p[key], "must be >= 0")
        if p["boundary"] not in BOUNDARIES:
            raise param_error("boundary", p["boundary"], f"must be one of {', '.join(BOUNDARIES)}")
        if not p["boundary_scale"] > 0.0:
            raise param_error("boundary_scale", p["boundary_scale"], "must be > 0")
        self.align_weight, self.boundary_weight = float(p["align_weight"]), float(p["boundary_weight"])
        self.stats = ctx.bank.class_stats()
        self.rows = view_class_rows(ctx)  # view label -> class-stats row
        angle = np.asarray(self.stats.angle_max if p["boundary"] == "max" else self.stats.angle_mean)
        angle = take_class_rows(angle, self.rows).astype(np.float64)
        angle = np.clip(angle * p["boundary_scale"], 0.0, np.pi)
        self.boundary_cos = np.cos(angle).astype(np.float32)  # [num_view_classes]
        # Only this rank's shard of the centres (1/world of the classes); not part of the state.
        self.register_buffer("shard_centres", shard_centres(ctx, self.stats, self.rows), persistent=False)
        # Classes without a record have no centre: out of the alignment mean (None: every class has one).
        known = self.rows >= 0
        head = ctx.head
        local = known[head.class_start : head.class_start + head.num_local]
        self.shard_aligned = None if known.all() else torch.from_numpy(local).to(ctx.device)
        self.num_aligned = int(known.sum())

    def batch_inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                     labels: np.ndarray) -> dict[str, Tensor]:
        rows = self.rows[labels]
        centres = np.asarray(self.stats.means[rows], dtype=np.float32)
        return {"centre": torch.from_numpy(centres),
                "boundary_cos": torch.from_numpy(self.boundary_cos[labels])}

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        head = self.ctx.head  # the trainer's module, deliberately not a child of this one
        weight, centres = head.weight, self.shard_centres
        if self.shard_aligned is not None:
            weight, centres = weight[self.shard_aligned], centres[self.shard_aligned]
        align = alignment_loss(weight, centres, self.num_aligned)
        if self.ctx.world_size > 1:  # value: the global mean; gradient: this shard's rows only
            share = align.detach()
            align = align + (dist.all_reduce_(share.clone(), "sum") - share)
        bound = boundary_loss(emb, inputs["centre"], inputs["boundary_cos"])
        terms = {"lce_align": (self.weight * self.align_weight) * align,
                 "lce_boundary": (self.weight * self.boundary_weight) * bound}
        return CompatOutput(emb, labels, terms)
