"""The contrastive objective (FCT's side-information model): NT-Xent against its formula and
across ranks, the two-view augmentation, its config checks, and the trainer end to end with a
mid-epoch resume."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from facecompat import checkpoint as ckpt
from facecompat import dist
from facecompat.config import AugmentConfig, ConfigError, load_config
from facecompat.data.augment import ViewMaker, ViewParams, apply_view
from facecompat.data.faces import FaceRecords
from facecompat.data.loader import TorchLoader, build_loader
from facecompat.models import get_model
from facecompat.train.contrastive import ContrastiveObjective, ProjectionHead, nt_xent_loss
from facecompat.train.precision import LossScaler
from facecompat.train.step import TrainStep
from facecompat.train.trainer import Trainer, TrainingError, train
from tests.helpers import REPO
from tests.helpers.dist import run_distributed
from tests.helpers.train import write_config


def direct_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss written out anchor by anchor: -log(exp(s_ip / T) / sum_{k != i} exp(s_ik / T))."""
    z = torch.cat([z_a, z_b])
    z = z / z.norm(dim=1, keepdim=True)
    m, n = len(z), len(z) // 2
    terms = []
    for i in range(m):
        sims = [torch.exp(z[i] @ z[k] / temperature) for k in range(m) if k != i]
        terms.append(-torch.log(torch.exp(z[i] @ z[(i + n) % m] / temperature) / sum(sims)))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- the loss


def test_nt_xent_on_orthonormal_views_has_the_closed_form():
    # Two images, both views the same unit vector: each anchor sees its positive at cosine 1
    # and the two other projections at cosine 0.
    z = torch.eye(2, dtype=torch.float64)
    for t in (0.1, 0.5):
        expected = math.log(1.0 + 2.0 * math.exp(-1.0 / t))
        assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_value_and_gradients_match_the_formula(temperature):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = nt_xent_loss(a, b, temperature)
    grads = torch.autograd.grad(loss, (a, b))
    ref = direct_nt_xent(a, b, temperature)
    ref_grads = torch.autograd.grad(ref, (a, b))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(a, b[:2], temperature)


def _two_rank_loss_and_step(rank: int, world: int, z_a: torch.Tensor, z_b: torch.Tensor,
                            images: torch.Tensor) -> tuple:
    """This rank's half of a global batch: the loss and its input gradients, then the parameter
    gradients of a contrastive step averaged over ranks."""
    n = len(z_a) // world
    rows = slice(rank * n, (rank + 1) * n)
    a, b = z_a[rows].clone().requires_grad_(), z_b[rows].clone().requires_grad_()
    loss = nt_xent_loss(a, b, 0.2)
    loss.backward()
    grads = _step_gradients(torch.cat([images[0, rows], images[1, rows]]), world)
    return loss.detach(), a.grad, b.grad, grads


def _step_gradients(images: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Parameter gradients of TrainStep.forward_loss (contrastive) for a tiny backbone + projection head on
    ``images`` (views stacked ``[2n, ...]``), averaged over ranks as DDP averages them. (DDP and
    torch.optim import torch._dynamo, seconds in a fresh process: the step gets a stand-in for
    the optimiser, whose parameter groups are all it reads here.)"""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    head = ProjectionHead(6, [8, 4])
    optim = SimpleNamespace(param_groups=[{"params": list(backbone.parameters())}])
    objective = ContrastiveObjective(head, 0.2)
    step = TrainStep(objective.wrap(backbone), backbone, objective, optim, LossScaler(enabled=False),
                     amp_dtype=None, channels_last=False, grad_clip=None, world_size=world)
    loss, _ = step.forward_loss(images, torch.zeros(len(images) // 2, dtype=torch.int64))
    loss.backward()
    params = [*backbone.parameters(), *head.parameters()]
    dist.average_gradients(params)
    return [p.grad for p in params]


def test_contrastive_step_learns_a_fixed_batch():
    """The contrastive step + SGD on one batch of two noisy views: the loss falls far below its start.
    (Measured: the mean of the last 5 of 30 steps is at most 0.12 of the first over 40 seeds, so
    the 0.5 bound holds on any CPU's float path; a wrong sign or a dead gradient stays near 1.)"""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16))
    head = ProjectionHead(16, [32, 8])
    optim = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    objective = ContrastiveObjective(head, 0.2)
    step = TrainStep(objective.wrap(backbone), backbone, objective, optim, LossScaler(enabled=False),
                     amp_dtype=None, channels_last=False, grad_clip=None, world_size=1)
    gen = torch.Generator().manual_seed(100)
    images = torch.randn(8, 3, 4, 4, generator=gen)
    views = torch.cat([images + 0.1 * torch.randn(images.shape, generator=gen) for _ in range(2)])
    losses = [step([(views, torch.zeros(8, dtype=torch.int64))])[0][0].item() for _ in range(30)]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_two_ranks_give_the_one_process_loss_and_gradients():
    gen = torch.Generator().manual_seed(1)
    z_a, z_b = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    images = torch.randn(2, 4, 3, 2, 2, generator=gen)  # [view, image, C, H, W]
    a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    ref = nt_xent_loss(a, b, 0.2)
    ref.backward()
    ref_grads = _step_gradients(torch.cat([images[0], images[1]]), world=1)
    results = run_distributed(_two_rank_loss_and_step, 2, z_a, z_b, images)
    for loss, *_ in results:  # every rank reports the global-batch loss
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), b.grad, rtol=1e-10, atol=1e-12)
    for *_, grads in results:  # each rank's averaged gradients are the one-process ones
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 sums in another order


# ----------------------------------------------------------------------------- augmentation


def test_views_are_deterministic_independent_and_differ():
    img = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)
    maker = ViewMaker(AugmentConfig(), seed=3)
    (v0, _), (v1, _) = maker(img, 7, epoch=0)
    again = maker(img, 7, epoch=0)
    assert np.array_equal(v0, again[0][0]) and np.array_equal(v1, again[1][0])
    assert not np.array_equal(v0, v1)
    assert not np.array_equal(v0, maker(img, 7, epoch=1)[0][0])
    assert not np.array_equal(v0, maker(img, 8, epoch=0)[0][0])
    assert not np.array_equal(v0, ViewMaker(AugmentConfig(), seed=4)(img, 7, epoch=0)[0][0])
    assert v0.shape == img.shape and v0.dtype == np.uint8
    flips = [p.flip for rid in range(100) for p in ViewMaker(AugmentConfig(), 0).params(rid, 0, 112, 112)]
    assert 20 < sum(flips) < 180  # flip_prob 0.5 per view
    no_flip = ViewMaker(AugmentConfig(), seed=0, flip=False)
    assert not any(p.flip for rid in range(50) for p in no_flip.params(rid, 0, 112, 112))
    # The whole image, unjittered: an exact copy, or an exact mirror.
    whole = (0.0, 0.0, 112.0, 112.0)
    assert np.array_equal(apply_view(img, ViewParams(whole, False, (), False)), img)
    assert np.array_equal(apply_view(img, ViewParams(whole, True, (), False)), img[:, ::-1])
    gray = apply_view(img, ViewParams(whole, False, (), True))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_loader_yields_both_views_and_resumes_to_the_same_pixels(synthetic_tiny):
    records = FaceRecords(synthetic_tiny / "train", seed=5)
    augment = AugmentConfig()
    loader = TorchLoader(records, 8, rank=0, world_size=1, num_workers=0, device="cpu", augment=augment)
    assert loader.views == 2
    loader.set_epoch(1)
    batches = list(loader)
    first = batches[0]
    assert first.images.shape == (16, 3, 112, 112) and first.flipped.shape == (16,)
    assert first.labels.shape == (8,) and first.record_ids.shape == (8,)
    # Row v * B + j is view v of image j, made by the ViewMaker of (data.seed, epoch, record id).
    maker = ViewMaker(augment, records.seed, flip=records.flip)
    j, rid = 3, int(first.record_ids[3])
    views = maker(cv2.cvtColor(records.read_image(rid), cv2.COLOR_BGR2RGB), rid, epoch=1)
    for v, (view, flipped) in enumerate(views):
        expected = (torch.from_numpy(view).permute(2, 0, 1).float() - 127.5) / 127.5
        torch.testing.assert_close(first.images[v * 8 + j], expected, rtol=0, atol=1e-6)
        assert bool(first.flipped[v * 8 + j]) == flipped
    loader.set_epoch(1, start_step=2)
    resumed = next(iter(loader))
    assert torch.equal(resumed.record_ids, batches[2].record_ids)
    assert torch.equal(resumed.images, batches[2].images)
    assert torch.equal(resumed.flipped, batches[2].flipped)
    with pytest.raises(ValueError, match="torch loader only"):
        build_loader(records, 8, backend="dali", device="cpu", augment=augment)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("sets, needle", [
    (["contrastive.temperature=0"], "contrastive.temperature: must be > 0"),
    (["contrastive.temperature=-0.5"], "contrastive.temperature: must be > 0"),
    (["contrastive.temprature=0.2"], "did you mean 'contrastive.temperature'"),
    (["contrastive.projection=[]"], "contrastive.projection: must be a non-empty list"),
    (["contrastive.projection=[128, 0]"], "contrastive.projection: must be a non-empty list"),
    (["contrastive.projection=[wide]"], "contrastive.projection[0]: expected int"),
    (["contrastive.augment.crop_scale=[0.9, 0.5]"], "contrastive.augment.crop_scale: must be"),
    (["contrastive.augment.crop_scale=[0.5]"], "contrastive.augment.crop_scale: expected list of 2"),
    (["contrastive.augment.grayscale_prob=1.5"], "contrastive.augment.grayscale_prob: must be in [0, 1]"),
    (["contrastive.augment.hue=0.7"], "contrastive.augment.hue: must be in [0, 0.5]"),
    (["train.objective=simclr"], "train.objective: expected one of 'arcface', 'contrastive'"),
    (["train.objective=contrastive", "compat.method=bct"],
     "compat.method: must be 'none' with train.objective contrastive, got 'bct'"),
    (["train.objective=contrastive", "data.loader=dali"],
     "data.loader: train.objective contrastive needs data.loader torch"),
])
def test_bad_contrastive_settings_are_one_line_errors(sets, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith("--set "), message


def test_default_objective_is_arcface_and_the_repo_configs_select_contrastive():
    assert load_config(REPO / "configs" / "base.yaml").train.objective == "arcface"
    for name in ("synthetic_fct_sideinfo.yaml", "ms1mv3_fct_sideinfo.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert (cfg.train.objective, cfg.model.embedding_size, cfg.data.part) == ("contrastive", 128, "old")
        assert cfg.compat.method == "none" and cfg.data.loader == "torch"


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory, synthetic_tiny):
    """One epoch of the contrastive objective over 96 images (6 steps of 16, checkpoints every 2),
    verification at the end."""
    tmp = tmp_path_factory.mktemp("contrastive")
    subset = tmp / "subset.txt"
    ids = FaceRecords(synthetic_tiny / "train").record_ids[::2][:96]
    subset.write_text("".join(f"{i}\n" for i in ids))
    cfg = write_config(tmp, synthetic_tiny, **{
        "train.objective": "contrastive", "train.epochs": 1, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.val_every": 100, "data.subset": str(subset),
        "contrastive.projection": [64, 32], "optim.lr": 0.1})
    summary = train(load_config(cfg, ["train.exp_name=ref"]), tmp / "runs" / "ref")
    return tmp, cfg, summary


def test_contrastive_training_writes_the_usual_run(contrastive_run):
    tmp, cfg, summary = contrastive_run
    run_dir = tmp / "runs" / "ref"
    assert summary["step"] == 6 and 0.0 <= summary["verification"]["lfw"] <= 1.0
    for name in ("model.pt", "config.yaml", "train.log", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    backbone = get_model("r18-w0.125", 64)  # model.pt: the backbone alone
    backbone.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True), strict=True)
    assert load_config(run_dir / "config.yaml") == load_config(cfg, ["train.exp_name=ref"])
    assert "self-supervised (contrastive" in (run_dir / "train.log").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    # Six SGD steps on fresh augmentations do not lower the loss on every CPU (an AMD EPYC gives
    # [3.74, 3.03, 2.75, 3.40, 3.42, 3.67]): that the step learns is the fixed-batch test below.
    # Here: one finite NT-Xent value per step, below its bound (16 images -> 32 projections,
    # log(31) + 2 / T), and weights that moved after the step-4 checkpoint.
    temperature = load_config(cfg).contrastive.temperature
    assert len(losses) == 6 and all(0.0 < x < math.log(31) + 2 / temperature for x in losses), losses
    last = ckpt.latest_checkpoint(run_dir)
    common = ckpt.load_common(last)
    assert {"projector", "optimizer", "backbone"} <= set(common)
    at_step_4 = ckpt.load_common(ckpt.list_checkpoints(run_dir)[0])
    final = torch.load(run_dir / "model.pt", weights_only=True)
    assert any(not torch.equal(at_step_4["backbone"][k], final[k]) for k in final)
    assert any(not torch.equal(at_step_4["projector"][k], v) for k, v in common["projector"].items())
    rank = torch.load(last / "rank_000.pt", weights_only=True)
    assert "head_weight" not in rank and "rng" in rank


def test_mid_epoch_resume_gives_the_uninterrupted_weights(contrastive_run):
    tmp, cfg, _ = contrastive_run
    ref_dir = tmp / "runs" / "ref"
    mid = ckpt.list_checkpoints(ref_dir)[0]
    assert mid.name == "step_00000004"  # kept: 4 (mid-epoch) and 6 (the epoch's end)
    summary = train(load_config(cfg, ["train.exp_name=resumed", f"train.resume={mid}"]),
                    tmp / "runs" / "resumed")
    assert summary["step"] == 6
    run_dir = tmp / "runs" / "resumed"
    assert "resumed from" in (run_dir / "train.log").read_text()
    ref_model = torch.load(ref_dir / "model.pt", weights_only=True)
    model = torch.load(run_dir / "model.pt", weights_only=True)
    for key in ref_model:
        assert torch.equal(model[key], ref_model[key]), key
    ref_common = ckpt.load_common(ckpt.latest_checkpoint(ref_dir))
    common = ckpt.load_common(ckpt.latest_checkpoint(run_dir))
    for key, value in ref_common["projector"].items():
        assert torch.equal(common["projector"][key], value), key
    for index, state in ref_common["optimizer"]["state"].items():
        assert torch.equal(common["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
    # A checkpoint of one objective does not resume the other.
    sets = ["train.objective=arcface", "train.exp_name=x", f"train.resume={mid}"]
    arcface = Trainer(load_config(cfg, sets), tmp / "runs" / "x")
    with pytest.raises(TrainingError, match="written by a train.objective contrastive run"):
        arcface._resume()


def test_resume_into_another_architecture_is_one_line(contrastive_run):
    """A checkpoint whose backbone or projection head does not fit the config names both."""
    tmp, cfg, _ = contrastive_run
    mid = ckpt.list_checkpoints(tmp / "runs" / "ref")[0]
    misfits = (("contrastive.projection", "[64, 16]", "projection head does not fit "
                "contrastive.projection=[64, 16]"),
               ("model.embedding_size", "32", "backbone does not fit model.network=r18-w0.125"))
    for key, value, needle in misfits:
        sets = [f"{key}={value}", "train.exp_name=misfit", f"train.resume={mid}"]
        trainer = Trainer(load_config(cfg, sets), tmp / "runs" / f"misfit-{key}")
        with pytest.raises(TrainingError, match=f"^{re.escape(f'{mid}: {needle} (')}") as err:
            trainer._resume()
        assert "\n" not in str(err.value) and "size mismatch" in str(err.value)
