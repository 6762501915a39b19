"""Compatibility methods BCT, L2, MixBCT against their definitions; the registry; the trainer plug-in.

The old model is a real (tiny) run trained here on the generated data's old part; banks are real
banks (``FeatureBank.from_arrays`` for hand-made features, ``ensure_bank`` through the trainer).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facecompat import checkpoint as ckpt
from facecompat import dist
from facecompat.compat import base, registry
from facecompat.compat.bct import BCT, old_labels_of, view_classes
from facecompat.compat.l2 import L2, l2_distance_loss
from facecompat.compat.mixbct import MixBCT, choose_mixed
from facecompat.config import ConfigError, load_config
from facecompat.data.loader import build_dataset
from facecompat.features import FeatureBank
from facecompat.heads import PartialFC
from facecompat.train.trainer import train
from tests.helpers.compat import DIM, context, new_config, random_bank
from tests.helpers.dist import run_distributed
from tests.helpers.train import write_config

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, synthetic_tiny) -> Path:
    """A real old run: the first 30% identities (opclass/exclass old part), 2 epochs, checkpoints."""
    tmp = tmp_path_factory.mktemp("old")
    cfg = load_config(write_config(tmp, synthetic_tiny, "old", **{
        "data.protocol": "exclass", "data.part": "old", "data.val_targets": [], "model.embedding_size": DIM,
        "train.epochs": 2, "train.checkpoint_every": 0}))
    run_dir = tmp / "runs" / "old"
    train(cfg, run_dir)
    return run_dir


# ----------------------------------------------------------------------------- registry and params


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert registry.list_methods() == ["advbct", "bct", "l2", "lce", "mixbct"]
    with pytest.raises(ConfigError, match=r"compat.method: unknown method 'mixbtc' \(valid: none, advbct"):
        registry.get_method("mixbtc")


def test_params_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match=r"compat.params.alpah: not a parameter of method 'mixbct'"):
        base.resolve_params("mixbct", MixBCT.defaults, {"alpah": 0.3})
    with pytest.raises(ConfigError, match=r"compat.params.alpha: expected float, got 'high'"):
        base.resolve_params("mixbct", MixBCT.defaults, {"alpha": "high"})
    with pytest.raises(ConfigError, match=r"compat.params.prototype: expected str, got 3"):
        base.resolve_params("bct", BCT.defaults, {"prototype": 3})
    assert base.resolve_params("mixbct", MixBCT.defaults, {"alpha": 1}) == {"alpha": 1.0, "keep_ratio": 0.9,
                                                                            "head_init": "random"}


# ----------------------------------------------------------------------------- L2


def test_l2_loss_and_gradient_follow_the_definition():
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, -5.0]])
    # unit vectors: identical (0), orthogonal (sqrt 2), opposite (2)
    expected = (0.0 + math.sqrt(2) + 2.0) / 3
    assert l2_distance_loss(emb, old).item() == pytest.approx(expected, abs=1e-6)
    # the free radius: relu(d - 0.5) -> (0 + sqrt2 - .5 + 1.5) / 3
    loss = l2_distance_loss(emb, old, tau=0.5)
    assert loss.item() == pytest.approx((math.sqrt(2) - 0.5 + 1.5) / 3, abs=1e-6)
    loss.backward()
    # row 0 inside the radius: no gradient; row 1: d/de of |e/|e| - o| at e=(1,0), o=(0,1)
    assert torch.equal(emb.grad[0], torch.zeros(2))
    e = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    ((e / e.norm() - torch.tensor([0.0, 1.0], dtype=torch.float64)).norm() / 3).backward()
    assert torch.allclose(emb.grad[1].double(), e.grad, atol=1e-6)


def test_l2_method_reads_the_matching_flip(tmp_path, synthetic_tiny):
    view = build_dataset(load_config(None, [f"data.rec={synthetic_tiny / 'train'}"]).data)
    bank = random_bank(tmp_path / "bank", view)
    head = PartialFC(DIM, view.num_classes)
    method = L2(context(view, head, bank, params={"tau": 0.2}, weight=10.0))
    ids, flips = view.record_ids[:4], np.array([False, True, False, True])
    inputs = method.batch_inputs(ids, flips, view.labels[:4])
    rows = bank.rows(ids)
    want = bank.features[rows, flips.astype(int)].astype(np.float32)
    assert np.array_equal(inputs["old"].numpy(), want)
    emb = torch.randn(4, DIM)
    out = method(emb, torch.as_tensor(view.labels[:4]), inputs)
    assert out.embeddings is emb
    assert out.terms["l2"].item() == pytest.approx(10.0 * l2_distance_loss(emb, inputs["old"], 0.2).item())
    with pytest.raises(ConfigError, match=r"compat.params.tau: must be in \[0, 2\)"):
        L2(context(view, head, bank, params={"tau": -1.0}))


# ----------------------------------------------------------------------------- MixBCT


def test_choose_mixed_takes_credible_rows_only_and_copes_with_too_few():
    gen = torch.Generator().manual_seed(0)
    credible = torch.tensor([True, False, True, True, False, True, True, False])
    for _ in range(20):
        mixed = choose_mixed(credible, 3, gen)
        assert int(mixed.sum()) == 3 and not (mixed & ~credible).any()
    few = torch.tensor([False, True, False, False, False, False])
    assert torch.equal(choose_mixed(few, 4, gen), few)  # one credible row: that one, no crash
    assert not choose_mixed(torch.zeros(5, dtype=torch.bool), 2, gen).any()
    assert not choose_mixed(credible, 0, gen).any()
    # seeded: the same stream gives the same choice
    a = choose_mixed(credible, 2, torch.Generator().manual_seed(5))
    b = choose_mixed(credible, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # uniform over the credible rows
    counts = torch.zeros(8)
    for _ in range(2000):
        counts += choose_mixed(credible, 1, gen).float()
    share = counts[credible] / 2000
    assert torch.all((share > 0.15) & (share < 0.25)), share


def test_mixbct_replaces_int_alpha_b_rows_by_the_old_feature_of_the_same_image(tmp_path, synthetic_tiny):
    view = build_dataset(load_config(None, [f"data.rec={synthetic_tiny / 'train'}"]).data)
    bank = random_bank(tmp_path / "bank", view)
    head = PartialFC(DIM, view.num_classes)
    method = MixBCT(context(view, head, bank, params={"alpha": 0.5, "keep_ratio": 0.5}))
    ids, flips = view.record_ids[:10], np.arange(10) % 2 == 0
    inputs = method.batch_inputs(ids, flips, view.labels[:10])
    assert np.array_equal(inputs["credible"].numpy(), bank.credible(0.5)[bank.rows(ids)])
    emb = torch.randn(10, DIM, requires_grad=True)
    out = method(emb, torch.as_tensor(view.labels[:10]), inputs)
    replaced = (out.embeddings != emb).any(dim=1)
    assert int(replaced.sum()) == min(5, int(inputs["credible"].sum()))
    assert not (replaced & ~inputs["credible"]).any()
    assert torch.equal(out.embeddings[replaced], inputs["old"][replaced])
    assert out.terms == {}
    out.embeddings.sum().backward()
    assert torch.equal(emb.grad[replaced], torch.zeros_like(emb.grad[replaced]))
    assert torch.equal(emb.grad[~replaced], torch.ones_like(emb.grad[~replaced]))
    # the generator is state: a restored method draws the same rows again
    state = method.state_dict()
    first = choose_mixed(inputs["credible"], 5, method.generator)
    method.load_state_dict(state)
    assert torch.equal(choose_mixed(inputs["credible"], 5, method.generator), first)


def test_mixbct_head_init_old_means_starts_each_rank_shard_at_the_old_class_means(tmp_path, synthetic_tiny):
    view = build_dataset(load_config(None, [f"data.rec={synthetic_tiny / 'train'}"]).data)
    bank = random_bank(tmp_path / "bank", view)
    stats = bank.class_stats()
    classes = view_classes(view)
    for rank in range(2):  # a two-rank layout: each rank's rows are its own classes' means
        head = PartialFC(DIM, view.num_classes, rank=rank, world_size=2)
        before = head.weight.detach().clone()
        MixBCT(context(view, head, bank, params={"head_init": "old_means"}))
        labels = np.arange(head.class_start, head.class_start + head.num_local)
        want = np.asarray(stats.means[bank.class_rows(classes[labels])], dtype=np.float32)
        assert np.allclose(head.weight.detach().numpy(), want) and not torch.equal(head.weight, before)
    head = PartialFC(DIM, view.num_classes)
    before = head.weight.detach().clone()
    MixBCT(context(view, head, bank))  # the default leaves the random initialisation alone
    assert torch.equal(head.weight, before)
    with pytest.raises(ConfigError, match="compat.params.head_init"):
        MixBCT(context(view, head, bank, params={"head_init": "zeros"}))


# ----------------------------------------------------------------------------- BCT


def test_old_labels_follow_the_dataset_classes_through_both_views(synthetic_tiny):
    rec = f"data.rec={synthetic_tiny / 'train'}"
    old = build_dataset(load_config(None, [rec, "data.protocol=exclass", "data.part=old"]).data)
    new_ex = build_dataset(load_config(None, [rec, "data.protocol=exclass", "data.part=new"]).data)
    new_op = build_dataset(load_config(None, [rec, "data.protocol=opclass", "data.part=new"]).data)
    labels = old_labels_of(view_classes(new_ex), old)
    seen = view_classes(old)
    assert np.array_equal(labels[seen], np.arange(seen.size))  # first 30%: old label = position
    assert (labels[np.setdiff1d(np.arange(new_ex.num_classes), seen)] == -1).all()
    assert (old_labels_of(view_classes(new_op), old) == -1).all()  # opclass: disjoint identities


def _arcface_loss(emb, weight, labels, margins, scale):
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    m1, m2, m3 = margins
    theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
    target = torch.cos(m1 * theta + m2) - m3
    logits = cos.scatter(1, labels[:, None], target) * scale
    return F.cross_entropy(logits, labels)


def test_bct_influence_loss_goes_through_the_old_classifier_with_its_margin(tmp_path, synthetic_tiny,
                                                                           old_run):
    cfg = new_config(tmp_path, synthetic_tiny, old_run, "bct")
    view = build_dataset(cfg.data)
    bank = random_bank(tmp_path / "bank", view)
    head = PartialFC(DIM, view.num_classes)
    old_cfg = load_config(old_run / "config.yaml")
    method = BCT(context(view, head, bank, weight=0.5, old_run_dir=old_run, old_config=old_cfg))
    rows, seen = method.old_head.weight.detach(), method.from_old_classifier
    # identities of the old part: the old run's class centres; the others: old class means
    old_labels = old_labels_of(view_classes(view), build_dataset(old_cfg.data))
    old_rows, _ = ckpt.load_head_rows(ckpt.latest_checkpoint(old_run), old_labels[seen.numpy()])
    assert int(seen.sum()) == 9 and torch.equal(rows[seen], old_rows)
    stats = bank.class_stats()
    means = torch.from_numpy(np.asarray(stats.means[bank.class_rows(view_classes(view))]))
    assert torch.equal(rows[~seen], means[~seen])
    assert tuple(method.old_head.margins) == tuple(old_cfg.head.margins)
    labels = torch.as_tensor(view.labels[:12])
    emb = torch.randn(12, DIM, requires_grad=True)
    term = method(emb, labels, {}).terms["bct"]
    ref_emb = emb.detach().clone().requires_grad_(True)
    ref = 0.5 * _arcface_loss(ref_emb, rows, labels, old_cfg.head.margins, old_cfg.head.scale)
    assert term.item() == pytest.approx(ref.item(), rel=1e-5)
    term.backward()
    ref.backward()
    assert torch.allclose(emb.grad, ref_emb.grad, atol=1e-6)
    assert not any(p.requires_grad for p in method.parameters())
    # class means everywhere for an old model without a classifier
    means_only = BCT(context(view, head, bank, params={"prototype": "class_mean"}))
    assert torch.equal(means_only.old_head.weight.detach(), means)
    with pytest.raises(ConfigError, match="prototype: 'classifier' needs the old model's run directory"):
        BCT(context(view, head, bank))


def _bct_two_ranks(rank, world, bank_dir, old_run, cfg_path):
    cfg = load_config(cfg_path)
    view = build_dataset(cfg.data)
    head = PartialFC(DIM, view.num_classes)
    method = BCT(context(view, head, FeatureBank.open(bank_dir), world_size=world, rank=rank,
                         old_run_dir=Path(old_run), old_config=load_config(Path(old_run) / "config.yaml")))
    torch.manual_seed(1)
    emb = torch.randn(16, DIM)
    labels = torch.as_tensor(view.labels[:16])
    mine = emb[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    term = method(mine, labels[rank * 8:(rank + 1) * 8], {}).terms["bct"]
    term.backward()
    # a replicated trainable part (a discriminator): gradients averaged over ranks
    layer = _replicated_layer()
    _layer_loss(layer, rank).backward()
    dist.average_gradients(list(layer.parameters()))
    return term.detach(), mine.grad, [p.grad for p in layer.parameters()]


def _replicated_layer() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Linear(4, 1)


def _layer_loss(layer: torch.nn.Module, rank: int) -> torch.Tensor:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (rank + 1)
    return layer(x).square().mean()


def test_bct_two_ranks_equal_one_process(tmp_path, synthetic_tiny, old_run):
    cfg = new_config(tmp_path, synthetic_tiny, old_run, "bct")
    view = build_dataset(cfg.data)
    random_bank(tmp_path / "bank", view)
    cfg_path = tmp_path / "bct.yaml"
    results = run_distributed(_bct_two_ranks, 2, str(tmp_path / "bank"), str(old_run), str(cfg_path))
    single = BCT(context(view, PartialFC(DIM, view.num_classes), FeatureBank.open(tmp_path / "bank"),
                         old_run_dir=old_run, old_config=load_config(old_run / "config.yaml")))
    torch.manual_seed(1)
    emb = torch.randn(16, DIM, requires_grad=True)
    term = single(emb, torch.as_tensor(view.labels[:16]), {}).terms["bct"]
    term.backward()
    layer = _replicated_layer()
    ((_layer_loss(layer, 0) + _layer_loss(layer, 1)) / 2).backward()
    for rank, (value, grad, layer_grads) in enumerate(results):
        assert value.item() == pytest.approx(term.item(), rel=1e-6)
        # each rank's gradient is scaled by the world size; DDP's average divides it back
        assert torch.allclose(grad / 2, emb.grad[rank * 8:(rank + 1) * 8], atol=1e-7)
        for got, want in zip(layer_grads, layer.parameters()):
            assert torch.allclose(got, want.grad, rtol=1e-6)


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, synthetic_tiny, old_run) -> dict:
    """Every registered method trained for one epoch by the trainer (one shared bank)."""
    tmp = tmp_path_factory.mktemp("methods")
    runs, progress = {}, []
    with pytest.MonkeyPatch.context() as mp:  # what the trainer tells methods that keep the default
        mp.setattr(base.CompatMethod, "set_progress", lambda self, p: progress.append(p))
        for method in registry.list_methods():
            # Partial FC sampling (ρ < 1) for the methods that read the head's classes or shard
            rho = 0.5 if method in ("bct", "lce", "mixbct") else 1.0
            cfg = new_config(tmp, synthetic_tiny, old_run, method, protocol="opclass",
                             **{"train.checkpoint_every": 3, "train.log_every": 1, "head.sample_rate": rho})
            run_dir = tmp / "runs" / method
            progress.clear()
            runs[method] = (cfg, run_dir, train(cfg, run_dir), list(progress))
    return runs


@pytest.mark.parametrize("method", ["bct", "l2", "mixbct", "lce", "advbct"])
def test_trainer_runs_each_method_and_logs_its_terms(method_runs, method):
    cfg, run_dir, summary, progress = method_runs[method]
    assert math.isfinite(summary["loss"])
    if method != "advbct":  # the trainer reported the share of training done before every step
        assert progress == [step / summary["step"] for step in range(summary["step"])]
    bank = FeatureBank.open(cfg.compat.bank_dir)
    assert bank.meta["model"]["network"] == "r18-w0.125" and len(bank) == build_dataset(cfg.data).num_images
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    expected = {"bct": {"loss_bct"}, "l2": {"loss_l2"}, "mixbct": set(),
                "lce": {"loss_lce_align", "loss_lce_boundary"},
                "advbct": {"loss_advbct_boundary", "loss_advbct_adv"}}[method]
    assert {"loss_arcface", *expected} <= set(train_rows[0]), train_rows[0]
    for r in train_rows:
        parts = sum(v for k, v in r.items() if k.startswith("loss_"))
        assert parts == pytest.approx(r["loss"], rel=1e-4)
    log = (run_dir / "train.log").read_text()
    assert f"compat {registry.get_method(method).__name__}(" in log  # the run says what it trains


# Methods with state of their own (a sampling stream; a discriminator and its optimiser rows) in
# CI; the stateless ones (their resume is the plain trainer's) with FACECOMPAT_SLOW=1.
@pytest.mark.parametrize("method", [
    "mixbct", "advbct",
    *(pytest.param(m, marks=pytest.mark.skipif(not os.environ.get("FACECOMPAT_SLOW"),
                                                reason="stateless method: FACECOMPAT_SLOW=1 runs it"))
      for m in ("bct", "l2", "lce"))])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(method_runs, tmp_path, synthetic_tiny, method):
    cfg, run_dir, *_ = method_runs[method]
    first = ckpt.list_checkpoints(run_dir)[0]
    again = tmp_path / "runs" / f"{method}-again"
    train(load_config(write_config(tmp_path, synthetic_tiny, f"{method}-again", **_sets(cfg, first))), again)
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(again / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), method


def _philox_state(seed: int, offset: int = 0) -> torch.Tensor:
    """What a CUDA generator's ``get_state()`` returns: 16 bytes, the Philox seed and offset."""
    return torch.from_numpy(np.array([seed, offset], dtype=np.uint64).view(np.uint8).copy())


def _as_if_written_on_a_gpu(checkpoint: Path, into: Path) -> Path:
    """A copy of ``checkpoint`` whose random streams are what a GPU run writes (CUDA states)."""
    import shutil

    shutil.copytree(checkpoint, into)
    for rank_file in sorted(into.glob("rank_*.pt")):
        state = torch.load(rank_file, weights_only=True)
        state["rng"]["sampler"] = _philox_state(11, 4096)
        state["rng"]["cuda"] = _philox_state(12, 8192)
        state["compat"]["_extra_state"]["generator"] = _philox_state(13, 64)
        torch.save(state, rank_file)
    meta = json.loads((into / "meta.json").read_text())
    meta["files"] = {name: (into / name).stat().st_size for name in meta["files"]}
    (into / "meta.json").write_text(json.dumps(meta))
    return into


def test_a_gpu_checkpoint_resumes_on_the_cpu_reseeded_and_reproducible(method_runs, tmp_path, synthetic_tiny):
    """The Partial FC sampler's and MixBCT's CUDA streams cannot load into CPU generators: both are
    re-seeded deterministically, the log says so, and two such resumes train the same weights."""
    cfg, run_dir, *_ = method_runs["mixbct"]
    gpu_written = _as_if_written_on_a_gpu(ckpt.list_checkpoints(run_dir)[0], tmp_path / "gpu_step")
    models = []
    for name in ("cross-a", "cross-b"):
        again = tmp_path / "runs" / name
        train(load_config(write_config(tmp_path, synthetic_tiny, name, **_sets(cfg, gpu_written))), again)
        log = (again / "train.log").read_text()
        assert "Partial FC negative-class sampler: the checkpoint's random stream was saved on another " \
               "device type (a 16-byte state; a cpu generator's is 5056 bytes); re-seeded" in log
        assert "MixBCT choice of mixed samples: the checkpoint's random stream was saved" in log
        models.append(torch.load(again / "model.pt", weights_only=True))
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    uninterrupted = torch.load(run_dir / "model.pt", weights_only=True)
    assert any(not torch.equal(uninterrupted[k], models[0][k]) for k in uninterrupted)  # other draws


def _sets(cfg, resume_from) -> dict:
    tree = cfg.to_dict()
    out = {f"{section}.{key}": value for section, values in tree.items() if isinstance(values, dict)
           for key, value in values.items()}
    out["train.resume"] = str(resume_from)
    return out


def test_trainer_rejects_a_bad_old_model_in_one_line(tmp_path, synthetic_tiny, old_run):
    with pytest.raises(ConfigError, match=r"compat.old.checkpoint: not set"):
        train(new_config(tmp_path, synthetic_tiny, old_run, "l2", **{"compat.old": {"checkpoint": None}}),
              tmp_path / "r1")
    with pytest.raises(ConfigError, match=r"compat.old.embedding_size: the old model's embeddings are 32-d"):
        train(new_config(tmp_path, synthetic_tiny, old_run, "l2", **{"model.embedding_size": 64}),
              tmp_path / "r2")
    with pytest.raises(ConfigError, match=r"compat.old.checkpoint: .*nowhere"):
        train(new_config(tmp_path, synthetic_tiny, old_run, "l2",
                         **{"compat.old": {"checkpoint": str(tmp_path / "nowhere")}}), tmp_path / "r3")
