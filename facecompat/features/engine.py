"""The embedding engine: uint8 face batches → features in one device buffer, and the loader that feeds it.

    feats = embed_batches(model, batches, device="cuda", autocast_dtype=torch.bfloat16)  # [N, D]
    both = embed_batches(model, batches, device="cuda", flip="pair")  # [N, 2, D]: image, flip

Each batch goes to the device as uint8 (a quarter of the bytes of float), is normalised there
(:func:`facecompat.data.normalize.normalize_images`, the training loader's normalisation), embedded
under autocast (:func:`embed_views`: flip fused as ``f(x) + f(flip(x))``, or image and flip kept
apart from one forward of both) and written into one float32 buffer on the device. Nothing comes
back to the host between batches, so the device runs ahead of Python until the caller reads the
result. Verification (:func:`facecompat.eval.verification.extract_embeddings`), IJB extraction
(:func:`facecompat.eval.extract.extract_features`) and the old-feature bank
(:mod:`facecompat.features.bank_build`, image and flip apart, one chunk per call) run on it, with the
same loader (:func:`inference_loader`) and worker count (:func:`default_num_workers`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import cv2
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facecompat.data.normalize import normalize_images

MAX_DEFAULT_WORKERS = 8  # per rank; see default_num_workers
PREFETCH_BATCHES = 4  # per worker: loose crops differ a lot in size, so batch times vary


FLIP_MODES = (True, False, "pair")


def fuse_flip(model: nn.Module, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """``model(x) + model(x flipped left-right)`` ([B, 3, H, W] -> [B, D]); ``model(x)`` without flip."""
    emb = model(x)
    if flip:
        emb = emb + model(torch.flip(x, dims=[3]))
    return emb


def embed_views(model: nn.Module, x: torch.Tensor, flip: bool | str = True) -> torch.Tensor:
    """The features of a normalised batch ``x`` [B, 3, H, W] as ``flip`` asks.

    ``True``: ``f(x) + f(flip(x))`` [B, D] (two forwards, :func:`fuse_flip`); ``False``: ``f(x)``;
    ``"pair"``: image and flip apart, [B, 2, D], from ONE forward of both (a batch of 2B: the
    old-feature bank's layout, which stores the two sides separately).
    """
    if flip == "pair":
        emb = model(torch.cat([x, x.flip(3)]))
        return torch.stack([emb[:x.shape[0]], emb[x.shape[0]:]], dim=1)
    if flip not in (True, False):
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    return fuse_flip(model, x, flip)


def _grown(buf: torch.Tensor | None, rows: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``buf`` if it has ``rows`` rows, else a float32 [max(rows, 2 * len(buf)), *shape] buffer on
    ``device`` that starts with ``buf``'s rows (a device-side copy: no host sync; doubling keeps it
    amortised)."""
    if buf is not None and buf.shape[0] >= rows:
        return buf
    out = torch.empty((max(rows, 0 if buf is None else 2 * buf.shape[0]), *shape), dtype=torch.float32,
                      device=device)
    if buf is not None:
        out[:buf.shape[0]] = buf
    return out


def embed_batches(model: nn.Module, batches: Iterable[torch.Tensor], *, device: str | torch.device,
                  flip: bool | str = True, autocast_dtype: torch.dtype | None = None,
                  num_rows: int | None = None) -> torch.Tensor:
    """Embed uint8 image batches into one float32 buffer on ``device``, without a host sync per batch.

    Each batch goes to ``device`` (``non_blocking``: overlapped when it is pinned), is normalised
    there (:func:`~facecompat.data.normalize.normalize_images`), embedded under ``autocast_dtype``
    (:func:`embed_views`) and written into a preallocated float32 device buffer;
    nothing is read back to the host, so the device runs ahead of Python until the caller reads the
    result. This is the inner loop of IJB extraction and verification, and the unit of their throughput.

    Args:
        model: backbone on ``device``; runs in eval mode under ``torch.inference_mode`` (its
            train/eval mode is restored after).
        batches: [B, 3, 112, 112] uint8 RGB tensors (B may vary).
        device: where the images go and the features stay.
        flip: ``True``: feature = f(img) + f(flip(img)); ``False``: f(img); ``"pair"``: both apart.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under autocast; the features are float32 anyway.
        num_rows: total images when known: the buffer is allocated once at that size (otherwise it
            grows by doubling, on the device).

    Returns:
        [N, D] ([N, 2, D] for ``"pair"``) float32 on ``device``, rows in batch order; ``[0, 0]`` when
        there are no images.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    device = torch.device(device)
    buf: torch.Tensor | None = None
    offset = 0
    was_training = model.training
    model.eval()
    try:
        for images in batches:
            autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                emb = embed_views(model, normalize_images(images.to(device, non_blocking=True)), flip)
            buf = _grown(buf, max(offset + len(emb), num_rows or 0), tuple(emb.shape[1:]), device)
            buf[offset:offset + len(emb)] = emb  # bf16/fp16 autocast outputs become float32 here
            offset += len(emb)
    finally:
        model.train(was_training)
    if buf is None:
        return torch.empty((0, 0), dtype=torch.float32, device=device)
    return buf[:offset]


def default_num_workers() -> int:
    """DataLoader workers per rank when the caller names none: the CPU cores this process may use,
    shared between the ranks on this machine (``LOCAL_WORLD_SIZE``), less one for the process that
    feeds the device; at least 1, at most :data:`MAX_DEFAULT_WORKERS`.

    Every face is a JPEG decode (and, for IJB, an affine warp) on one core, about a millisecond or
    two, while a GPU embeds an r50 at thousands of faces per second: the loader needs the machine's
    cores, not the 2 workers that suit a CPU run. The cap keeps a large machine from forking dozens
    of processes per rank, each with its own copy of OpenCV's and torch's memory.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(cores // local_ranks - 1, MAX_DEFAULT_WORKERS))


def inference_loader(dataset: Dataset, device: torch.device, num_workers: int, *, batch_size: int = 1,
                     batch_sampler: Iterable[Any] | None = None, collate_fn: Callable | None = None,
                     prefetch_factor: int | None = PREFETCH_BATCHES) -> DataLoader:
    """In-order batches of ``dataset`` for extraction: pinned for a CUDA device, decoded by workers.

    Args:
        dataset: a map-style dataset (batched by ``batch_size``), or one read whole batch by whole
            batch through ``batch_sampler`` and ``collate_fn``.
        device: where the batches go (pinned host memory for CUDA).
        num_workers: DataLoader processes; 0 reads in this process.
        prefetch_factor: batches each worker reads ahead (``None``: the DataLoader's default).
    """
    if num_workers:
        # Forked workers inherit OpenCV's thread count but not its pool's threads; with 0 they never
        # touch that pool, and the parallelism is the worker processes (as the training loader does).
        cv2.setNumThreads(0)
    return DataLoader(dataset, batch_size=batch_size, batch_sampler=batch_sampler, shuffle=False,
                      collate_fn=collate_fn, num_workers=num_workers, pin_memory=device.type == "cuda",
                      drop_last=False, prefetch_factor=prefetch_factor if num_workers else None)
