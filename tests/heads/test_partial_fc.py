"""facecompat.heads.partial_fc: sharded, sampled margin softmax against a one-process full softmax.

The distributed checks run in one 2-process and one 3-process gloo spawn each (C = 10 is not divisible
by 3); every configuration is run inside that spawn and compared here with a float64 reference:
``F.cross_entropy`` on ``s * margin(cos)`` over the full (or the union of the sampled) class centres.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facecompat.checkpoint import slice_rows
from facecompat.config import HeadConfig
from facecompat.heads import LabelError, PartialFC, build_head, head_memory_bytes, init_centres
from tests.helpers.dist import run_distributed

C, D, B_LOCAL, SEED = 10, 8, 4, 3

# name -> (PartialFC keyword arguments, number of classes, dtype, tolerance)
CONFIGS: dict[str, tuple[dict, int, torch.dtype, float]] = {
    "arcface": ({"margins": (1.0, 0.5, 0.0), "scale": 64.0}, C, torch.float32, 1e-5),
    "straight_through": ({"margins": (1.0, 0.3, 0.2), "scale": 64.0, "exact_grad": False},
                         C, torch.float32, 1e-5),
    "cosface_f64": ({"margins": (1.0, 0.0, 0.4), "scale": 30.0}, C, torch.float64, 1e-10),
    "m1_f64": ({"margins": (1.2, 0.4, 0.1), "scale": 16.0}, C, torch.float64, 1e-10),
    "sampled": ({"sample_rate": 0.5, "scale": 64.0}, C, torch.float32, 1e-5),
    "sampled_few": ({"sample_rate": 0.2, "scale": 64.0}, C, torch.float32, 1e-5),  # positives > int(rho n)
    "fewer_classes_than_ranks": ({"scale": 64.0}, 2, torch.float64, 1e-10),
}


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [W*b, D] float64, labels [W*b] in [0, C) (duplicates, 0 and C-1), inputs [W*b, 6]."""
    g = torch.Generator().manual_seed(world)
    n = world * B_LOCAL
    labels = torch.randint(0, C, (n,), generator=g)
    labels[:3] = torch.tensor([0, C - 1, 0])
    return torch.randn(n, D, generator=g, dtype=torch.float64), labels, torch.randn(n, 6, generator=g,
                                                                                   dtype=torch.float64)


def reference(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, kwargs: dict,
              columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, d/d emb and d/d centres [C, D] of the full softmax in float64 (one process).

    ``columns``: the global class ids the sampled heads used (others get no logit and a zero gradient).
    """
    m1, m2, m3 = kwargs.get("margins", (1.0, 0.5, 0.0))
    s = kwargs["scale"]
    emb = emb.clone().requires_grad_(True)
    weight = init_centres(0, num_classes, D, SEED).double().requires_grad_(True)
    cos = (F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T).clamp(-1, 1)
    c = cos.gather(1, labels[:, None])[:, 0]
    theta, theta_t = torch.acos(c), (math.pi - m2) / m1
    target = torch.cos(m1 * theta + m2) - m3
    if theta_t < math.pi:
        target = torch.where(theta <= theta_t, target, c - (math.pi - theta_t) * math.sin(theta_t) - m3)
    if not kwargs.get("exact_grad", True):
        target = c + (target - c).detach()
    logits = (s * cos).scatter(1, labels[:, None], s * target[:, None])
    if columns is not None:
        logits, labels = logits[:, columns], torch.searchsorted(columns, labels)
    loss = F.cross_entropy(logits, labels)
    grad_emb, grad_w = torch.autograd.grad(loss, [emb, weight])
    return loss.detach(), grad_emb, grad_w


def _run_configs(rank: int, world: int) -> dict:
    emb_all, labels_all, x_all = global_batch(world)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    out: dict = {}
    for name, (kwargs, num_classes, dtype, _) in CONFIGS.items():
        labels = labels_all % num_classes
        head = PartialFC(D, num_classes, seed=SEED, **kwargs).to(dtype)
        emb = emb_all[rows].to(dtype).requires_grad_(True)
        state = head.generator.get_state()
        index = head.sample_classes(labels)  # what the next forward will draw
        head.generator.set_state(state)
        loss = head(emb, labels[rows])
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_emb": emb.grad, "grad_w": head.weight.grad,
                     "class_start": head.class_start, "num_local": head.num_local, "index": index,
                     "num_sample": head.num_sample}

    # An out-of-range label on one rank: every rank raises the same error.
    bad = labels_all[rows].clone()
    if rank == world - 1:
        bad[2] = C + 5
    try:
        PartialFC(D, C)(emb_all[rows].float(), bad)
        out["label_error"] = None
    except LabelError as err:
        out["label_error"] = str(err)

    if world == 2:
        # A backbone as DDP with dist.sum_allreduce_hook runs it: local backward, then SUM over ranks.
        # (DDP itself is left out: constructing one imports torch._dynamo, ~3 s per process.)
        from facecompat import dist

        torch.manual_seed(0)
        backbone = nn.Linear(6, D).double()
        head = PartialFC(D, C, seed=SEED).double()
        head(backbone(x_all[rows]), labels_all[rows]).backward()
        out["backbone_grad"] = dist.all_reduce_(backbone.weight.grad, "sum")
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_full_softmax(world: int) -> None:
    results = run_distributed(_run_configs, world)
    emb_all, labels_all, x_all = global_batch(world)
    for name, (kwargs, num_classes, _, tol) in CONFIGS.items():
        labels = labels_all % num_classes
        per_rank = [res[name] for res in results]
        assert [r["class_start"] for r in per_rank] == [sum(p["num_local"] for p in per_rank[:i])
                                                        for i in range(world)]
        assert sum(r["num_local"] for r in per_rank) == num_classes
        assert max(r["num_local"] for r in per_rank) - min(r["num_local"] for r in per_rank) <= 1
        columns = None
        if kwargs.get("sample_rate", 1.0) < 1.0:
            parts = []
            for r in per_rank:
                owned = labels[(labels >= r["class_start"]) & (labels < r["class_start"] + r["num_local"])]
                positives = set((owned - r["class_start"]).tolist())
                index = r["index"].tolist()
                assert index == sorted(index) and positives <= set(index), name
                assert len(index) == max(r["num_sample"], len(positives)), name
                parts.append(r["index"] + r["class_start"])
            columns = torch.cat(parts)
        loss, grad_emb, grad_w = reference(emb_all, labels, num_classes, kwargs, columns)
        for rank, r in enumerate(per_rank):
            assert r["loss"].item() == per_rank[0]["loss"].item(), f"{name}: loss differs between ranks"
            torch.testing.assert_close(r["loss"].double(), loss, rtol=tol, atol=tol, msg=name)
            rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
            torch.testing.assert_close(r["grad_emb"].double(), grad_emb[rows], rtol=tol, atol=tol, msg=name)
            shard = slice(r["class_start"], r["class_start"] + r["num_local"])
            torch.testing.assert_close(r["grad_w"].double(), grad_w[shard], rtol=tol, atol=tol, msg=name)

    messages = {res["label_error"] for res in results}
    position = world * B_LOCAL - B_LOCAL + 2
    assert messages == {f"label {C + 5} at position {position} of the global batch (rank {world - 1}, "
                        f"sample 2) is outside [0, {C}): no rank owns it (1 bad label(s) in the batch)"}

    if world == 2:
        torch.manual_seed(0)
        backbone = nn.Linear(6, D).double()
        PartialFC(D, C, seed=SEED).double()(backbone(x_all), labels_all).backward()
        for res in results:
            torch.testing.assert_close(res["backbone_grad"], backbone.weight.grad, rtol=1e-10, atol=1e-12)


def test_init_is_independent_of_world_size() -> None:
    num_classes, dim = 9000, 16  # spans several initialisation blocks
    full = PartialFC(dim, num_classes, seed=7).weight.detach()
    for world in (2, 3, 4):
        heads = [PartialFC(dim, num_classes, seed=7, rank=r, world_size=world) for r in range(world)]
        assert [h.num_local for h in heads] == [num_classes // world + (r < num_classes % world)
                                                for r in range(world)]
        torch.testing.assert_close(torch.cat([h.weight.detach() for h in heads]), full, rtol=0, atol=0)
    assert abs(full.std().item() - 0.01) < 3e-4 and abs(full.mean().item()) < 3e-4
    assert not torch.equal(PartialFC(dim, 10, seed=8).weight, full[:10])


def test_resharding_between_world_sizes() -> None:
    num_classes, dim = 10, 4
    old = [PartialFC(dim, num_classes, rank=r, world_size=4) for r in range(4)]
    for h in old:  # trained weights: distinguishable from any initialisation
        with torch.no_grad():
            h.weight.copy_(torch.arange(h.class_start, h.class_start + h.num_local)[:, None].expand(-1, dim))
    shards = [h.shard_state() for h in reversed(old)]  # any order
    full = torch.arange(num_classes, dtype=torch.float32)[:, None].expand(num_classes, dim)
    for world in (1, 2, 3):
        for r in range(world):
            head = PartialFC(dim, num_classes, seed=5, rank=r, world_size=world)
            head.load_shards(shards)
            expected = full[head.class_start : head.class_start + head.num_local]
            torch.testing.assert_close(head.weight.detach(), expected)
    head = PartialFC(dim, num_classes, rank=1, world_size=3)
    head.load_state_dict(old[0].state_dict() | {"weight": full[4:7].clone()})
    assert list(head.state_dict()) == ["weight"] and head.weight[0, 0].item() == 4.0
    with pytest.raises(ValueError, match="num_classes=11, embedding_size=4"):
        PartialFC(dim, 11).load_shards(shards)
    with pytest.raises(ValueError, match=r"rows \[3, 8\) are not covered"):
        PartialFC(dim, num_classes).load_shards([shards[0], shards[3]])  # classes 8-9 and 0-2
    assert slice_rows([(2, torch.ones(3, 4))], 3, 5).shape == (2, 4)


def test_labels_are_validated() -> None:
    head = PartialFC(D, C)
    emb = torch.randn(3, D)
    with pytest.raises(LabelError, match=r"label -1 at position 1 of the global batch \(rank 0, sample 1\)"):
        head(emb, torch.tensor([0, -1, 3]))
    with pytest.raises(LabelError, match="int64"):
        head(emb, torch.tensor([0, 1, 3], dtype=torch.int32))
    with pytest.raises(LabelError, match=r"labels must be \[3\]"):
        head(emb, torch.tensor([0, 1]))
    assert torch.isfinite(PartialFC(D, C, check_labels=False)(emb, torch.tensor([0, 1, 3])))
    with pytest.raises(RuntimeError, match="built for rank 1 of 2"):
        PartialFC(D, C, rank=1, world_size=2)(emb, torch.tensor([0, 1, 3]))


def test_sampling_generator_and_positives() -> None:
    head = PartialFC(D, 1000, sample_rate=0.1, seed=1)
    labels = torch.tensor([5, 5, 999, 17] * 20)
    state = head.generator.get_state()
    first = head.sample_classes(labels)
    head.generator.set_state(state)
    assert torch.equal(head.sample_classes(labels), first)  # checkpointable stream
    assert len(first) == 100 and {5, 17, 999} <= set(first.tolist())
    many = torch.arange(0, 1000, 5)  # 200 positives > int(0.1 * 1000)
    assert head.sample_classes(many).tolist() == many.tolist()
    other_rank = PartialFC(D, 2000, sample_rate=0.1, seed=1, rank=1, world_size=2)  # same local positives:
    assert not torch.equal(other_rank.sample_classes(labels + 1000), first)  # rank-dependent draws
    emb = torch.randn(len(labels), D, requires_grad=True)
    head(emb, labels).backward()
    assert int((head.weight.grad.abs().sum(1) > 0).sum()) == 100  # zero rows for unsampled classes


def test_sampling_reads_the_positive_count_only_when_it_can_exceed_the_sample(monkeypatch) -> None:
    """The sampled count is max(int(rho n), #positives); when the batch cannot hold more positives
    than int(rho n) it is known without reading the count back (no host sync on a GPU)."""
    reads = []
    to_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or to_int(t))
    head = PartialFC(D, 1000, sample_rate=0.1, seed=1)  # samples 100 of 1000
    small = torch.arange(0, 960, 12)  # 80 positives in a batch of 80 <= 100
    chosen = head.sample_classes(small)
    assert len(chosen) == 100 and set(small.tolist()) <= set(chosen.tolist()) and reads == []
    big = torch.arange(0, 1000, 5)  # a batch of 200 could hold 200 positives > 100: read the count
    assert head.sample_classes(big).tolist() == big.tolist() and reads == [1]


def test_autocast_bf16_runs_in_float32() -> None:
    head = PartialFC(D, C, scale=16.0)
    emb, labels = torch.randn(6, D), torch.tensor([0, 1, 2, 3, 9, 9])
    ref = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(emb.requires_grad_(True), labels)
    assert low.dtype == torch.float32
    low.backward()
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_build_head_and_repr() -> None:
    head = build_head(HeadConfig(margins=(1.0, 0.0, 0.4), scale=32.0, sample_rate=0.5), num_classes=10,
                      embedding_size=D, seed=2)
    assert head.margins == (1.0, 0.0, 0.4) and head.margin.scale == 32.0
    assert head.sample_rate == 0.5 and head.num_local == 10
    text = repr(head)
    assert "num_classes=10" in text and "shard=[0, 10)" in text and "sample_rate=0.5" in text
    assert "margins=(1.0, 0.0, 0.4)" in text


def test_memory_formula() -> None:
    mem = head_memory_bytes(2_000_000, 512, 8, 0.1, 1024)
    num_local = 250_000
    assert mem["weights"] == mem["grads"] == mem["optimizer"] == num_local * 512 * 4
    adamw = head_memory_bytes(2_000_000, 512, 8, 0.1, 1024, optimizer="adamw")
    assert adamw["optimizer"] == 2 * mem["weights"]
    assert mem["total"] == sum(v for k, v in mem.items() if k not in ("total", "peak"))
    assert mem["logits"] == 2 * 1024 * 25_000 * 4 and mem["peak"] <= mem["total"]
