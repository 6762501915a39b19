"""The IJB records every step shares: the meta (:class:`IJBMeta`, :class:`Subjects`), its error
(:class:`IJBMetaError`), the gallery names per target and the template-id -> row lookup.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from facecompat.errors import UserError

GALLERY_NAMES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


class IJBMetaError(UserError, ValueError):
    """A missing or malformed IJB meta file; the message names the file and the line or value."""


@dataclass
class Subjects:
    """1:N templates of a gallery or of the probe set: ``template_ids`` [T] sorted, ``subject_ids`` [T]."""

    template_ids: np.ndarray
    subject_ids: np.ndarray


@dataclass
class IJBMeta:
    """Everything the IJB protocols need, in the face order of the feature files.

    Attributes:
        image_names: [N] image names, line order of ``*_name_5pts_score.txt`` (= feature rows).
        landmarks: [N, 5, 2] float32 (x, y) per face.
        det_scores: [N] float32 detector scores.
        template_ids, media_ids: [N] int64, joined from ``*_face_tid_mid.txt`` by image name;
            -1 for faces absent from it (only with ``allow_missing``; pooling skips them).
        pair_t1, pair_t2: [M] int64 template ids; pair_labels: [M] int8 (1 = genuine).
        galleries: gallery name (G1/G2 or S1/S2) -> :class:`Subjects`; empty without 1:N files.
        probes: :class:`Subjects` of the probe templates, or None without 1:N files.
        num_missing_faces: faces dropped from either face file (``allow_missing``).
        num_missing_pairs: pairs dropped for naming templates with no face (``allow_missing``).
    """

    target: str
    image_names: np.ndarray
    landmarks: np.ndarray
    det_scores: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray
    galleries: dict[str, Subjects] = field(default_factory=dict)
    probes: Subjects | None = None
    num_missing_faces: int = 0
    num_missing_pairs: int = 0
    # pair template rows per template list (every model of one meta pools to the same list)
    _pair_rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def clear_cache(self) -> None:
        """Forget the cached pair rows (a benchmark that times the lookup again)."""
        self._pair_rows = {}

    def pair_rows(self, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the pairs' first and second templates in ``templates`` (sorted ids), cached."""
        key = hashlib.sha1(np.ascontiguousarray(templates, np.int64).tobytes()).hexdigest()
        if key not in self._pair_rows:
            self._pair_rows = {key: (_template_rows(templates, self.pair_t1, "pair file"),
                                     _template_rows(templates, self.pair_t2, "pair file"))}
        return self._pair_rows[key]

    @property
    def num_faces(self) -> int:
        return len(self.image_names)

    @property
    def has_1n(self) -> bool:
        return self.probes is not None and bool(self.galleries)


def _preview(values: Sequence[object], n: int = 5) -> str:
    shown = ", ".join(str(v) for v in list(values)[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _template_rows(templates: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """int32 row of every id of ``ids`` in the sorted ``templates``; IJBMetaError naming ``what`` if absent.

    Template ids are small non-negative integers (IJB-C's go to ~190k), so a lookup table is one
    gather per id; a searchsorted of IJB-C's 15.6M unsorted pair ids costs ~2 s per column.
    """
    ids = np.asarray(ids)
    if templates.size == 0:
        if ids.size:
            raise IJBMetaError(f"{what}: templates without faces: {_preview(np.unique(ids).tolist())}")
        return np.zeros(0, np.int32)
    low, high = int(templates[0]), int(templates[-1])
    if low >= 0 and high < max(1 << 24, 4 * ids.size) and (ids.size == 0 or ids.min() >= 0):
        table = np.full(high + 2, -1, np.int32)  # the last slot answers every id above the range
        table[templates] = np.arange(templates.size, dtype=np.int32)
        rows = np.take(table, ids, mode="clip")
        bad = rows < 0
    else:  # ids too spread for a table
        rows = np.minimum(np.searchsorted(templates, ids), templates.size - 1).astype(np.int32)
        bad = templates[rows] != ids
    if bad.any():
        raise IJBMetaError(f"{what}: templates without faces: {_preview(np.unique(ids[bad]).tolist())}")
    return rows
