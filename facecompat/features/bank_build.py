"""Building the old-feature bank (:mod:`facecompat.features.bank`): resumable collective extraction.

    bank = ensure_bank(view, spec, default_bank_dir(cfg.train.output, spec, view))   # every rank

The bank's records are cut into chunks of ``chunk_rows`` (in ascending record id); ``progress.npy``
marks the chunks whose rows are flushed, so a killed build resumes where it stopped, under any world
size. Each rank embeds its chunks with the old model through the embedding engine
(:func:`~facecompat.features.engine.embed_batches`, ``flip="pair"``: image and flip apart, from one
forward of both, normalised on the device as the training loader does), one chunk per call: a
chunk's features stay on the device until its last batch and come back to the host once, as float16.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from facecompat import dist
from facecompat.data.faces import FaceRecords
from facecompat.data.loader import BatchKey, _BatchReader
from facecompat.features.bank import (
    BANK_META,
    BUILD_META,
    FEATURES,
    FORMAT,
    LABELS,
    PROGRESS,
    RECORD_IDS,
    BankError,
    FeatureBank,
    bank_meta,
    dataset_classes,
    load_npy,
    read_json,
    records_fingerprint,
    save_npy,
    write_json,
)
from facecompat.features.engine import default_num_workers, embed_batches, inference_loader
from facecompat.models.spec import ModelSpec, load_model


def _sorted_view(view: FaceRecords) -> FaceRecords:
    """A copy of ``view`` in ascending record-id order, without random flips."""
    order = np.argsort(np.asarray(view.record_ids), kind="stable")
    out = copy.copy(view)
    out.record_ids = np.asarray(view.record_ids, dtype=np.int64)[order]
    out.labels = np.asarray(view.labels, dtype=np.int64)[order]
    out.flip = False
    return out


def _prepare(directory: Path, build: dict, record_ids: np.ndarray, classes: np.ndarray) -> None:
    """Rank 0: create the build files, or check that the unfinished build there is this one."""
    stored = read_json(directory / BUILD_META)
    if stored is not None:
        # source_rec is informative only: the dataset fingerprint says whether the records are the same
        diff = [k for k in build if k != "source_rec" and stored.get(k) != build[k]]
        if diff:
            raise BankError(f"{directory}: holds an unfinished build of another model or dataset (differs in "
                            f"{', '.join(diff)}); remove it or choose another bank directory")
        n, dim, chunks = build["num_records"], build["embedding_size"], _num_chunks(build)
        for name, shape, dtype in ((FEATURES, (n, 2, dim), np.float16), (PROGRESS, (chunks,), np.uint8)):
            array = load_npy(directory / name, name, directory)
            if array.shape != shape or array.dtype != dtype:
                raise BankError(f"{directory}: unfinished build with a damaged {name} ({array.dtype} "
                                f"{tuple(array.shape)}, expected {np.dtype(dtype)} {shape}); remove it")
        return
    # A new build; build.json goes last, so its presence means every other file is whole.
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BANK_META).unlink(missing_ok=True)
    save_npy(directory / RECORD_IDS, record_ids)
    save_npy(directory / LABELS, classes)
    np.lib.format.open_memmap(directory / FEATURES, mode="w+", dtype=np.float16,
                              shape=(build["num_records"], 2, build["embedding_size"])).flush()
    save_npy(directory / PROGRESS, np.zeros(_num_chunks(build), np.uint8))
    write_json(directory / BUILD_META, build)


def _num_chunks(build: dict) -> int:
    return -(-build["num_records"] // build["chunk_rows"])


def _identity(batch: Any) -> Any:
    return batch


def _batch_keys(chunks: Iterable[int], num: int, chunk_rows: int,
                batch_size: int) -> list[tuple[int, BatchKey]]:
    """(chunk, BatchKey) of every batch of ``chunks``, batches never crossing a chunk's end."""
    keys = []
    for c in chunks:
        stop = min(num, (c + 1) * chunk_rows)
        for start in range(c * chunk_rows, stop, batch_size):
            keys.append((c, BatchKey(0, np.arange(start, min(start + batch_size, stop), dtype=np.int64))))
    return keys


def _extract_chunks(model: torch.nn.Module, view: FaceRecords, directory: Path, chunks: list[int],
                    chunk_rows: int, *, batch_size: int, num_workers: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: bool) -> None:
    """Embed the records of ``chunks`` (image and flip) into features.npy; mark each chunk done once
    its rows are flushed.

    Each chunk is one call of the embedding engine (:func:`embed_batches`, ``flip="pair"``: image and
    flip from one forward): its features collect on ``device`` and come back to the host once, after its
    last batch, as float16, where they are checked and written: nothing waits for the device between
    batches.
    """
    feats = np.load(directory / FEATURES, mmap_mode="r+")
    done = np.load(directory / PROGRESS, mmap_mode="r+")
    num, dim = feats.shape[0], feats.shape[2]
    keys = _batch_keys(chunks, num, chunk_rows, batch_size)
    loader = _chunk_loader(view, [k for _, k in keys], num_workers, device)
    bar = tqdm(total=2 * sum(len(k.positions) for _, k in keys), unit="img",
               desc=f"features {directory.name}",
               disable=not progress or dist.get_rank() != 0, leave=False)

    def images(batches: Iterable[tuple[tuple[int, BatchKey], Any]]) -> Iterator[torch.Tensor]:
        for _, host in batches:
            yield host.images
            bar.update(2 * len(host.images))

    for chunk, batches in itertools.groupby(zip(keys, loader), key=lambda item: item[0][0]):
        start = chunk * chunk_rows
        emb = embed_batches(model, images(batches), device=device, flip="pair", autocast_dtype=autocast_dtype,
                            num_rows=min(num, start + chunk_rows) - start)
        if emb.ndim != 3 or emb.shape[-1] != dim:
            raise BankError(f"{directory}: the old model outputs {tuple(emb.shape[2:])}-d embeddings, "
                            f"its spec says {dim}")
        _store_chunk(emb.to(torch.float16), feats, done, chunk, start, view.record_ids, directory)
    bar.close()


def _chunk_loader(view: FaceRecords, keys: list[BatchKey], num_workers: int,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """In-order host batches of ``keys``, each read whole by the training loader's batch reader:
    float32 normalised in the workers for a CPU device, uint8 otherwise (normalised on the device
    the same way); pinned for CUDA so the copies overlap."""
    return inference_loader(_BatchReader(view, normalize=device.type == "cpu"), device, num_workers,
                            batch_sampler=keys, collate_fn=_identity, prefetch_factor=None)


def _store_chunk(chunk_feats: torch.Tensor, feats: np.ndarray, done: np.ndarray, chunk: int, start: int,
                 record_ids: np.ndarray, directory: Path) -> None:
    """Check a chunk's float16 ``[n, 2, D]`` device features, write them at row ``start`` of
    features.npy and mark the chunk done once they are flushed."""
    finite = torch.isfinite(chunk_feats).flatten(1).all(dim=1)
    out = chunk_feats.cpu().numpy()  # the one wait for the device per chunk
    finite = finite.cpu().numpy()
    if not finite.all():
        bad = int(record_ids[start + int(np.flatnonzero(~finite)[0])])
        raise BankError(f"{directory}: the old model's feature of record {bad} is not finite in float16")
    feats[start:start + len(out)] = out
    feats.flush()  # rows reach the file before the chunk is marked done
    done[chunk] = 1
    done.flush()


def build_bank(view: FaceRecords, spec: ModelSpec, directory: str | os.PathLike, *, batch_size: int = 256,
               num_workers: int | None = None, device: torch.device | str | None = None,
               autocast_dtype: torch.dtype | None = None, chunk_rows: int = 8192, progress: bool = True,
               max_chunks: int | None = None) -> FeatureBank:
    """Extract the old model's features of every record of ``view`` into ``directory``.

    Every rank calls it (one process: the same). Rank 0 creates the files or checks the unfinished
    build there (same records, dimension, chunking, model); the chunks not yet done are split
    ``todo[rank::world]`` (so a build resumes under another world size), each rank embeds its chunks
    batch by batch (image and flip in one forward) into a device buffer per chunk, reads each chunk
    back once (no host sync per batch) and marks it done once its rows are flushed. Rank 0 then
    writes ``bank.json`` and every rank opens the bank.

    Args:
        view: the training view (any record order; flips are ignored: both sides are stored).
        spec: the old model (loaded with :func:`~facecompat.models.spec.load_model`).
        batch_size: images per forward (x2 with the flips).
        num_workers: DataLoader processes decoding images; ``None``:
            :func:`~facecompat.features.engine.default_num_workers` (the machine's cores, at most 8 per
            rank); 0 decodes in this process. The features do not depend on it.
        device: where the model runs (default CUDA when available, else CPU).
        autocast_dtype: run under autocast with this dtype (e.g. ``torch.float16`` on CUDA).
        chunk_rows: records per chunk, the unit of resumption.
        progress: a tqdm bar (rank 0).
        max_chunks: stop after this many chunks on this rank (tests: simulates a kill).

    Raises:
        ValueError: ``num_workers`` < 0.
        BankError: an unfinished build of another model/dataset in ``directory``, a model whose output
            dimension is not ``spec.embedding_size``, non-finite features (checked per chunk; names the
            first record), or a build left unfinished (``max_chunks``).
    """
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 decodes in this process), got {num_workers}")
    workers = default_num_workers() if num_workers is None else num_workers

    directory = Path(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    sorted_view = _sorted_view(view)
    classes = dataset_classes(sorted_view)
    num, dim = sorted_view.num_images, int(spec.embedding_size)
    if num == 0:
        raise BankError(f"{directory}: the training view has no records")
    build: dict | None = None
    problem = None
    if rank == 0:
        build = {"format": FORMAT, "num_records": num, "embedding_size": dim, "chunk_rows": int(chunk_rows),
                 "model": {**spec.fingerprint(), "name": spec.name},
                 "dataset": records_fingerprint(sorted_view.record_ids, classes),
                 "source_rec": str(view.path)}
        try:
            _prepare(directory, build, sorted_view.record_ids, classes)
        except (BankError, OSError) as exc:
            problem = str(exc)
    problem, build = dist.broadcast_object((problem, build))  # type: ignore[misc]
    if problem is not None:
        raise BankError(problem)
    todo = np.flatnonzero(np.load(directory / PROGRESS) == 0).tolist()
    mine = todo[rank::world][:max_chunks]
    error: Exception | None = None
    if mine:
        try:
            device = dist.resolve_device(device)
            model = load_model(spec, device)
            _extract_chunks(model, sorted_view, directory, mine, int(chunk_rows), batch_size=batch_size,
                            num_workers=workers, device=device, autocast_dtype=autocast_dtype,
                            progress=progress)
        except Exception as exc:  # agree on failure: a rank that raised alone would leave the others waiting
            if world == 1:
                raise
            error = exc
    if dist.all_reduce_flag(error is not None):
        raise error if error is not None else BankError(f"{directory}: extraction failed on another rank")
    if rank == 0:
        left = int((np.load(directory / PROGRESS) == 0).sum())
        if left:
            problem = (f"{directory}: unfinished build, {left} of {_num_chunks(build)} chunks left "
                       "(stopped by max_chunks); run again to resume")
        else:
            meta = {k: v for k, v in build.items() if k != "format"}
            write_json(directory / BANK_META, bank_meta(**meta))
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise BankError(problem)
    bank = FeatureBank.open(directory)
    bank.num_extracted = int(sum(min(num, (c + 1) * chunk_rows) - c * chunk_rows for c in todo))
    return bank


def ensure_bank(view: FaceRecords, spec: ModelSpec, directory: str | os.PathLike, *,
                credible_ratios: Sequence[float] = (), **build_kw: Any) -> FeatureBank:
    """The bank of ``view`` under ``spec`` in ``directory``: opened when complete, else built or resumed.

    A complete bank must match: :meth:`FeatureBank.check_model` and :meth:`FeatureBank.check_view`
    (a mismatch is a BankError, never a silent rebuild). Then rank 0 computes the class statistics and
    the credible masks of ``credible_ratios`` while the other ranks wait. Every rank returns the bank.

    Args:
        build_kw: passed to :func:`build_bank`.
    """
    directory = Path(directory)
    rank = dist.get_rank()
    complete, problem = False, None
    if rank == 0:
        meta = read_json(directory / BANK_META)
        complete = meta is not None and meta.get("complete") is True
        if complete:
            try:
                bank = FeatureBank.open(directory)
                bank.check_model(spec.fingerprint())
                bank.check_view(view)
            except BankError as exc:
                problem = str(exc)
    complete, problem = dist.broadcast_object((complete, problem))  # type: ignore[misc]
    if problem is not None:
        raise BankError(problem)
    bank = FeatureBank.open(directory) if complete else build_bank(view, spec, directory, **build_kw)
    if rank == 0:
        try:
            bank.class_stats()
            for ratio in credible_ratios:
                bank.credible(ratio)
        except (BankError, ValueError, OSError) as exc:
            problem = str(exc)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise BankError(problem)
    return bank
