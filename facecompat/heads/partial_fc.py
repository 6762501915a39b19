"""Partial FC: margin softmax over class centres sharded across ranks, optionally sampled.

Parallel layout (after insightface's PartialFC v2): rank r owns the contiguous rows
``[class_start, class_start + num_local)`` of the ``[C, D]`` centre matrix. A step

1. all-gathers the embeddings (with gradient) and the labels, so every rank sees the global batch;
2. computes cosine logits of the global batch against its own (sampled) centres and applies the
   margin to the target logits it owns;
3. runs a distributed softmax cross-entropy: max and sum of exponentials are all-reduced, the target
   logit comes from its owner rank by an all-reduce sum.

Every rank returns the same scalar, the mean loss over the global batch, and the gradient that rank's
graph sends to its local embeddings (through the reduce-scatter backward of the all-gather) is exactly
``d(global mean loss) / d(local embeddings)``: no world-size factor. Under DDP, average-reducing the
backbone gradients would therefore divide them by the world size; register
:func:`facecompat.dist.sum_allreduce_hook` on the DDP model (arcface_torch instead multiplies the
embedding gradient by the world size and lets DDP average; facecompat.train scales the embedding
gradient by the world size before DDP's average, which is equivalent). Wrap only the backbone in DDP:
the head's parameters are rank-local shards whose gradients are already complete, and must not be
averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecompat import dist
from facecompat.checkpoint import slice_rows
from facecompat.errors import UserError
from facecompat.heads.margins import CombinedMargin

_INIT_STD = 0.01
# Centres are initialised in blocks of this many rows, each block from its own seeded generator, so a
# class's initial centre does not depend on the world size and no rank materialises the full matrix.
_INIT_BLOCK_ROWS = 4096
_MASK64 = (1 << 64) - 1


class LabelError(UserError, ValueError):
    """A label that no rank owns (outside [0, num_classes)), or labels of the wrong dtype/shape."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (so (seed, block) and (seed, rank) streams do not collide)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``: contiguous, balanced (the first C % W ranks get one more)."""
    base, extra = divmod(num_classes, world_size)
    num_local = base + (1 if rank < extra else 0)
    return rank * base + min(rank, extra), num_local


def init_centres(start: int, stop: int, embedding_size: int, seed: int = 0) -> Tensor:
    """Initial centres of classes ``[start, stop)``: ``[stop - start, D]`` float32, N(0, 0.01^2).

    Row k is the same whichever range it is generated in (the matrix is drawn in fixed blocks of rows,
    each from a generator seeded with (seed, block index)).
    """
    out = torch.empty(stop - start, embedding_size)
    gen = torch.Generator()
    for block in range(start // _INIT_BLOCK_ROWS, (stop - 1) // _INIT_BLOCK_ROWS + 1 if stop > start else 0):
        b0 = block * _INIT_BLOCK_ROWS
        gen.manual_seed(_derive_seed(seed, 0x1A17, block))
        rows = torch.randn(_INIT_BLOCK_ROWS, embedding_size, generator=gen).mul_(_INIT_STD)
        lo, hi = max(start, b0), min(stop, b0 + _INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
    return out


class _DistSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch, the classes sharded over ranks.

    Forward needs two small all-reduces (max of ``[B]`` row maxima; sum of ``[2, B]`` exponential sums
    and owned target logits); backward is local: ``(softmax - onehot) / B`` on this rank's columns.
    The softmax buffer is turned into the gradient in place (one ``[B, n]`` buffer instead of two), so
    this graph can be backpropagated only once.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: object) -> Tensor:  # type: ignore[override]
        batch, n = logits.shape
        has_target = labels >= 0
        cols = labels.clamp_min(0).unsqueeze(1)
        if n > 0:
            row_max = logits.amax(dim=1)
            target = torch.where(has_target, logits.gather(1, cols).squeeze(1), 0.0)
        else:  # an empty shard contributes nothing
            row_max = logits.new_full((batch,), float("-inf"))
            target = logits.new_zeros(batch)
        row_max = dist.all_reduce_(row_max, "max", group)
        probs = logits - row_max.unsqueeze(1)
        probs.exp_()
        # One all-reduce for both sums. Each row's target is owned by exactly one rank (labels were
        # validated), so the sum over ranks of the masked target logits is the target logit.
        sum_exp, target = dist.all_reduce_(torch.stack([probs.sum(dim=1), target]), "sum", group)
        # -log softmax = log(sum exp(z - max)) + max - z_target: no log of a clamped probability.
        loss = (sum_exp.log() + row_max - target).mean()
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, cols, has_target)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("PartialFC's cross-entropy reuses its softmax buffer for the gradient: "
                               "backpropagate through it only once")
        ctx.used = True
        probs, cols, has_target = ctx.saved_tensors
        if probs.shape[1] > 0:
            probs.scatter_add_(1, cols, -has_target.to(probs.dtype).unsqueeze(1))
        return probs.mul_(grad / probs.shape[0]), None, None


class PartialFC(nn.Module):
    """Margin-softmax head with class centres sharded over the ranks of ``group`` and sampled.

    Args:
        embedding_size: D.
        num_classes: C, the total number of classes over all ranks.
        sample_rate: rho; each step a rank keeps the positive classes of the global batch it owns plus
            uniformly random other local classes up to ``int(rho * num_local)`` (all positives are kept
            even if they are more). 1.0: every centre, no sampling.
        margins: (m1, m2, m3) of :class:`CombinedMargin`; scale: its s.
        exact_grad: true margin gradient, or arcface_torch's straight-through one.
        group: the process group (None: the default group, or one process).
        seed: seeds the centre initialisation (per row block, independent of the world size) and the
            sampling generator (with the rank).
        check_labels: validate every label is in [0, C) (one host sync per step); a trainer that
            validates labels on the CPU side can switch it off.
        rank, world_size: the layout to build, defaulting to the group's. Overriding them builds one
            shard of another layout in one process (re-sharding, tests); ``forward`` then requires the
            live group to match.

    Attributes:
        weight: ``[num_local, D]`` parameter, rows ``[class_start, class_start + num_local)``.
        generator: ``torch.Generator`` for sampling, on the weight's device (checkpoint its state after
            moving the head; moving it to another device re-seeds it).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        margins: Sequence[float] = (1.0, 0.5, 0.0),
        scale: float = 64.0,
        *,
        exact_grad: bool = True,
        group: object | None = None,
        seed: int = 0,
        check_labels: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(
                f"embedding_size and num_classes must be > 0, got {embedding_size}, {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if len(margins) != 3:
            raise ValueError(f"margins must be (m1, m2, m3), got {tuple(margins)}")
        self.group = group
        self.world_size = dist.get_world_size(group) if world_size is None else int(world_size)
        self.rank = dist.get_rank(group) if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.sample_rate = float(sample_rate)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.margins = tuple(float(m) for m in margins)
        self.seed, self.check_labels = int(seed), bool(check_labels)
        self.margin = CombinedMargin(*self.margins, scale=scale, exact_grad=exact_grad)
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        self._sample_seed = _derive_seed(self.seed, 0x5A3D, self.rank)
        self.generator = torch.Generator()
        self.generator.manual_seed(self._sample_seed)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.01^2) centres, class k's row the same for every world size (see :func:`init_centres`)."""
        stop = self.class_start + self.num_local
        rows = init_centres(self.class_start, stop, self.embedding_size, self.seed)
        with torch.no_grad():
            self.weight.copy_(rows)

    def extra_repr(self) -> str:
        stop = self.class_start + self.num_local
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"shard=[{self.class_start}, {stop}) rank {self.rank}/{self.world_size}, "
                f"sample_rate={self.sample_rate}, margins={self.margins}, scale={self.margin.scale}")

    @property
    def sample_seed(self) -> int:
        """The seed of this rank's negative-class sampling stream."""
        return self._sample_seed

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PartialFC:
        super()._apply(fn, recurse)
        # Keep the sampling generator on the weight's device (torch.rand needs them to match).
        device = self.weight.device
        if device.type != "meta" and self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self._sample_seed)
        return self

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """Mean margin-softmax loss over the global batch.

        Args:
            local_embeddings: ``[b, D]`` this rank's (unnormalised) embeddings; b equal on every rank.
            local_labels: ``[b]`` int64 class ids in [0, num_classes).
        Returns:
            A scalar float32 tensor, the same value on every rank.
        """
        self._check_local(local_embeddings, local_labels)
        emb = dist.all_gather_with_grad(local_embeddings, self.group)  # [B, D]
        labels = dist.all_gather_tensor(local_labels, self.group)  # [B]
        if self.check_labels:
            self._validate_labels(labels, local_labels.shape[0])
        local = self._local_columns(labels)
        index = self.sample_classes(labels)
        if index is None:
            weight = self.weight
        else:
            # Indexing the parameter makes autograd scatter the gradient into the full weight.grad (zero
            # rows for unsampled classes), as PartialFC v2 does.
            weight = self.weight[index]
            remapped = torch.searchsorted(index, local.clamp_min(0))
            local = torch.where(local >= 0, remapped, -1)
        # The matmul may run in reduced precision under autocast; the margin clamps the cosines to
        # [-1, 1] in float32 and the softmax runs in float32. Peak: two [B, n] float32 buffers forward
        # (margin logits + softmax) and two backward (softmax-as-gradient + margin gradient).
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
        logits = self.margin(cos, local)
        del cos  # not saved by the graph: free it before the softmax buffer is allocated
        return _DistSoftmaxCE.apply(logits, local, self.group)

    def _local_columns(self, labels: Tensor) -> Tensor:
        """``[B]`` column of each global label in this shard, -1 where another rank owns the class."""
        local = labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, -1)

    def _check_local(self, emb: Tensor, labels: Tensor) -> None:
        live_world, live_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if (live_world, live_rank) != (self.world_size, self.rank):
            raise RuntimeError(f"head built for rank {self.rank} of {self.world_size} but the process group "
                               f"has rank {live_rank} of {live_world}")
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [b, {self.embedding_size}], got {list(emb.shape)}")
        if labels.dtype != torch.int64:
            raise LabelError(f"labels must be int64, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
            raise LabelError(f"labels must be [{emb.shape[0]}] (one per embedding), got {list(labels.shape)}")

    def _validate_labels(self, labels: Tensor, local_batch: int) -> None:
        # Every rank checks the same gathered labels, so every rank raises the same error.
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0, 0])
            raise LabelError(
                f"label {int(labels[pos])} at position {pos} of the global batch (rank {pos // local_batch}, "
                f"sample {pos % local_batch}) is outside [0, {self.num_classes}): no rank owns it "
                f"({int(bad.sum())} bad label(s) in the batch)")

    def sample_classes(self, labels: Tensor) -> Tensor | None:
        """The local centres one step uses, drawing from :attr:`generator`.

        Args:
            labels: ``[B]`` the global batch's labels.
        Returns:
            ``None`` when every local centre is used (``sample_rate`` 1, or ``int(rho * num_local)``
            covers the shard); else sorted local row indices ``[n]``: every positive class this rank owns
            plus uniformly random others, ``n = max(int(rho * num_local), #positives)``.
        """
        if self.sample_rate >= 1.0 or self.num_sample >= self.num_local:
            return None
        local = self._local_columns(labels)
        # Positive classes: index_add (not scatter) so duplicate labels cannot overwrite each other.
        counts = torch.zeros(self.num_local, dtype=torch.int32, device=local.device)
        counts.index_add_(0, local.clamp_min(0), (local >= 0).to(torch.int32))
        positive = counts > 0
        # Uniform random negatives: positives get score 2 > any uniform draw, then the top n. One draw
        # per local class every step, so the generator advances the same whatever the labels.
        scores = torch.rand(self.num_local, generator=self.generator, device=self.weight.device)
        scores.masked_fill_(positive.to(scores.device), 2.0)
        if self.num_sample >= min(labels.shape[0], self.num_local):
            num_sampled = self.num_sample  # the positives cannot outnumber it: no host sync (the usual case)
        else:
            num_sampled = max(self.num_sample, int(positive.sum()))  # host sync: the shape depends on it
        return torch.topk(scores, num_sampled, sorted=False).indices.sort().values.to(local.device)

    def shard_state(self) -> dict:
        """This rank's shard with its class range, for checkpoints loadable at any world size."""
        return {"class_start": self.class_start, "num_local": self.num_local, "num_classes": self.num_classes,
                "embedding_size": self.embedding_size, "weight": self.weight.detach().cpu().clone()}

    def load_shards(self, shards: Sequence[dict]) -> None:
        """Load this rank's rows from :meth:`shard_state` dicts saved under any world size."""
        for s in shards:
            if s["num_classes"] != self.num_classes or s["embedding_size"] != self.embedding_size:
                raise ValueError(
                    f"shard has num_classes={s['num_classes']}, embedding_size={s['embedding_size']}; "
                    f"this head has num_classes={self.num_classes}, embedding_size={self.embedding_size}")
        rows = slice_rows([(s["class_start"], s["weight"]) for s in shards],
                          self.class_start, self.class_start + self.num_local)
        with torch.no_grad():
            self.weight.copy_(rows)


def head_memory_bytes(
    num_classes: int,
    embedding_size: int,
    world_size: int,
    sample_rate: float,
    global_batch: int,
    optimizer: str = "sgd",
    param_bytes: int = 4,
    logit_bytes: int = 4,
) -> dict[str, int]:
    """Bytes the Partial FC head holds on its largest rank, by component and at its peak.

    Components: ``weights``; ``grads`` (dense, as PartialFC v2); ``optimizer`` state (SGD with momentum:
    1 copy, AdamW: 2); ``sampled_weights`` (the gathered rows and their normalised copy, both saved for
    backward; only the normalised copy at ``sample_rate`` 1); ``logits``: the two ``[B, n]`` buffers
    alive together (margin logits + softmax forward, softmax-as-gradient + margin gradient backward).
    ``total`` is their sum; ``peak`` the largest of the step's phases, with gradients set to None
    between steps (``zero_grad()``'s default): forward/backward through the logits (weights, optimizer,
    sampled weights, logits), the dense gradient being scattered at the end of backward (weights,
    optimizer, grads, one ``[n, D]`` gradient of the sampled rows), and the optimizer step (weights,
    optimizer, grads). Not included: the ``[B, D]`` embedding buffers (small) and the one weight-sized
    temporary that foreach SGD/AdamW allocate for weight decay (``fused=True`` avoids it).
    """
    opt_copies = {"sgd": 1, "sgd_nomomentum": 0, "adamw": 2, "adam": 2}
    if optimizer not in opt_copies:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(opt_copies)}")
    num_local = -(-num_classes // world_size)
    num_sampled, sampled_copies = num_local, 1
    if sample_rate < 1.0:  # positives are kept even beyond int(rho * n): at most min(B, n) of them
        num_sampled = max(int(sample_rate * num_local), min(global_batch, num_local))
        sampled_copies = 2
    param = num_local * embedding_size * param_bytes
    rows = num_sampled * embedding_size * param_bytes
    out = {
        "weights": param,
        "grads": param,
        "optimizer": opt_copies[optimizer] * param,
        "sampled_weights": sampled_copies * rows,
        "logits": 2 * global_batch * num_sampled * logit_bytes,
    }
    out["total"] = sum(out.values())
    resident = out["weights"] + out["optimizer"]
    out["peak"] = resident + max(out["sampled_weights"] + out["logits"], out["grads"] + rows)
    return out
