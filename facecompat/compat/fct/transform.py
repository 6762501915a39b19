"""The saved transformation: a directory with ``transform.pt``, ``fct.json`` (written last) and
``metrics.jsonl``; :class:`FCTransform` loads and applies it in chunks on any device."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facecompat.compat.fct.config import FCTError
from facecompat.compat.fct.network import Transformation
from facecompat.fileio import atomic_write, file_sha1

FORMAT = 1
WEIGHTS, META, METRICS = "transform.pt", "fct.json", "metrics.jsonl"
APPLY_CHUNK_ROWS = 1 << 18  # FCTransform.apply's rows per read-back: 512 MiB of 512-d float32 predictions


def model_record(name: str, spec: Any, role: str) -> dict:
    return {"role": role, "name": name, "source": spec.source, "network": spec.network,
            "embedding_size": spec.embedding_size, "weights": str(spec.weights), **spec.fingerprint()}


class FCTransform:
    """A trained transformation loaded for use (CPU or a given device)."""

    def __init__(self, module: Transformation, meta: dict, directory: Path):
        self.module, self.meta, self.directory = module.eval(), meta, directory
        self.output_norm = float(meta.get("output_norm", 1.0))

    @property
    def uses_side(self) -> bool:
        return self.module.side_dim > 0

    @property
    def version(self) -> str:
        """Short id of this transformation (``fct-<sha1 of its weights>``)."""
        return f"fct-{self.meta['weights_sha1'][:12]}"

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> FCTransform:
        """Open a transformation directory; FCTError names what is missing or damaged."""

        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise FCTError(f"{directory}: no {META} (not a transformation, or training did not finish)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise FCTError(f"{meta_path}: unreadable ({exc})") from None
        if meta.get("format") != FORMAT:
            raise FCTError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT}")
        weights = directory / WEIGHTS
        if not weights.is_file():
            raise FCTError(f"{weights}: missing")
        if file_sha1(weights) != meta.get("weights_sha1"):
            raise FCTError(f"{weights}: does not match {META} (weights_sha1 differs; damaged or replaced)")
        arch = meta["architecture"]
        module = Transformation(arch["old_dim"], arch["side_dim"], arch["new_dim"], arch["hidden"],
                                arch["uncertainty"])
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state, strict=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise FCTError(f"{weights}: cannot load ({str(exc).splitlines()[0]})") from None
        return cls(module.to(device), meta, directory)

    def check_models(self, old_fingerprint: dict, side_fingerprint: dict | None = None) -> None:
        """FCTError unless the given old (and side-information) models are the ones h was trained on."""
        for role, given in (("old", old_fingerprint), ("side", side_fingerprint)):
            want = self.meta["models"].get(role)
            if want is None or given is None:
                continue
            if given.get("checkpoint_sha1") != want["checkpoint_sha1"]:
                raise FCTError(f"{self.directory}: trained on the {role} model {want['source']} "
                               f"(sha1 {want['checkpoint_sha1'][:12]}); the features given come from "
                               f"another (sha1 {str(given.get('checkpoint_sha1'))[:12]})")

    @torch.no_grad()
    def apply(self, old: np.ndarray, side: np.ndarray | None = None, *, batch_size: int = 65536,
              chunk_rows: int = APPLY_CHUNK_ROWS,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Upgrade features in chunks: float32 ``[N, D_new]`` predictions (h's output times
        ``output_norm``) and ``[N]`` σ² of the unit-scale prediction (or None).

        A chunk's predictions stay on the device until its last batch and come back at once, with
        its inputs' finite checks (made on the device): one wait for the device per chunk.

        Args:
            old: ``[N, D_old]`` old-model features (any norm; fused flips as evaluation stores them).
            side: ``[N, D_side]`` side-information features of the same items (with side-info).
            batch_size: rows per forward.
            chunk_rows: rows per read-back, rounded up to whole batches (bounds device memory: 512 MiB
                of 512-d predictions by default). The results do not depend on it.
            progress: called with the number of rows done after each chunk.
        Raises:
            FCTError: missing or extra side-information, wrong dimensions or row counts, non-finite input
                (names the rows of the first batch holding it).
        """
        m = self.module
        if old.ndim != 2 or old.shape[1] != m.old_dim:
            raise FCTError(f"old features are {tuple(old.shape)}, this transformation takes [N, {m.old_dim}]")
        if self.uses_side:
            if side is None:
                raise FCTError(f"{self.directory}: needs {m.side_dim}-d side-information features; "
                               "none given")
            if side.shape != (old.shape[0], m.side_dim):
                raise FCTError(f"side-information features are {tuple(side.shape)}, expected "
                               f"[{old.shape[0]}, {m.side_dim}] (one per old feature)")
        elif side is not None:
            raise FCTError(f"{self.directory}: trained without side-information; side features were given")
        out = np.empty((old.shape[0], m.new_dim), np.float32)
        var = np.empty(old.shape[0], np.float32) if m.log_var is not None else None
        step = batch_size * max(1, -(-chunk_rows // batch_size))
        for start in range(0, old.shape[0], step):
            stop = min(start + step, old.shape[0])
            self._apply_chunk(old, side, start, stop, batch_size, out, var)
            if progress is not None:
                progress(stop)
        return out, var

    def _apply_chunk(self, old: np.ndarray, side: np.ndarray | None, start: int, stop: int, batch_size: int,
                     out: np.ndarray, var: np.ndarray | None) -> None:
        """Rows ``[start, stop)`` batch by batch into device buffers, then into ``out`` and ``var``."""
        m = self.module
        device = next(m.parameters()).device
        pred_buf = torch.empty((stop - start, m.new_dim), dtype=torch.float32, device=device)
        var_buf = None if var is None else torch.empty(stop - start, dtype=torch.float32, device=device)
        batch_starts = range(start, stop, batch_size)
        finite = torch.empty(len(batch_starts), dtype=torch.bool, device=device)
        for i, b0 in enumerate(batch_starts):
            b1 = min(b0 + batch_size, stop)
            o = _rows_to_device(old[b0:b1], device)
            s = None if side is None else _rows_to_device(side[b0:b1], device)
            ok = torch.isfinite(o).all()
            finite[i] = ok if s is None else ok & torch.isfinite(s).all()  # on the device: no wait
            pred, log_var = m(o, s)
            pred_buf[b0 - start:b1 - start] = pred.float().mul_(self.output_norm)
            if var_buf is not None:
                var_buf[b0 - start:b1 - start] = torch.exp(log_var).float()
        bad = np.flatnonzero(~finite.cpu().numpy())  # the one wait for the device per chunk
        if bad.size:
            b0 = batch_starts[int(bad[0])]
            raise FCTError(f"input features of rows {b0}..{min(b0 + batch_size, stop) - 1} hold NaN or inf")
        out[start:stop] = pred_buf.cpu().numpy()
        if var is not None:
            var[start:stop] = var_buf.cpu().numpy()


def _rows_to_device(rows: np.ndarray, device: torch.device) -> Tensor:
    """A float32 copy of ``rows`` on ``device``; for CUDA through pinned memory, ``non_blocking`` (a copy
    from pageable memory would first wait for the GPU's queued work)."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)
    host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
    host.numpy()[...] = rows
    return host.to(device, non_blocking=True)


def save_transformation(directory: Path, module: Transformation, meta: dict) -> Path:
    """Write ``transform.pt`` then ``fct.json`` (with the weights' sha1), each atomically."""

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS
    with atomic_write(weights, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, f)
    meta = {"format": FORMAT, **meta, "weights_sha1": file_sha1(weights)}
    with atomic_write(directory / META, "w") as f:
        json.dump(meta, f, indent=1)
    return directory
