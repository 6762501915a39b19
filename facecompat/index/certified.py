"""What a certificate (``tools/certify.py``) tells the gallery side: which query space may search which
gallery space, and at which score threshold for a FAR.

    pairs = read_certified_pairs("work_dirs/cert/certificate.json")
    declared = {(p.query, p.gallery) for p in pairs if p.compatible}     # instead of --declare
    pair_for(pairs, query_version, gallery_space).threshold("0.001")     # the cross cell's threshold

A certificate names models (``bct``, ``old``) and records each one's store version id under
``"versions"`` (``<network>-<sha1 of the weights>``, FCT: ``fct-<sha1>``), so a pair is matched to a
store by the ids its rows carry, never by a name. A candidate's cross cell gives the pair (its query
space, the old gallery space) with the decision at the operating FAR; self cells give the threshold of a
gallery in the query's own space. A certificate made from precomputed features has no versions and
declares nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from facecompat.errors import UserError

FORMAT = "facecompat-certificate"


class CertificateError(UserError, ValueError):
    """A certificate that cannot be read or does not cover what is asked (one line, names the file)."""


@dataclass(frozen=True)
class CertifiedPair:
    """One (query space, gallery space) pair of a certificate.

    Attributes:
        query, gallery: store version ids. cell: the certificate's ``q|g`` cell. candidate: the model
        certified (None for a self cell). decision: "compatible", "incompatible", "too close to call",
        or "self" (a model against its own gallery). far: the operating FAR of the decision.
        thresholds: FAR key (``"0.001"``) -> the cell's score threshold there (resolved FARs only).
        source: the certificate file.
    """

    query: str
    gallery: str
    cell: str
    candidate: str | None
    decision: str
    far: str
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def compatible(self) -> bool:
        return self.decision in ("compatible", "self")

    def threshold(self, far: str) -> float:
        """The cell's threshold at ``far``; CertificateError when the certificate did not resolve it."""
        if far not in self.thresholds:
            resolved = ", ".join(self.thresholds) or "none"
            raise CertificateError(f"{self.source}: cell {self.cell} has no threshold at FAR {far} "
                                   f"(resolved: {resolved})")
        return self.thresholds[far]


def _thresholds(cert: dict, cell: str) -> dict[str, float]:
    return {far: e["threshold"] for far, e in cert["cells"].get(cell, {}).get("1:1", {}).items()
            if e.get("threshold") is not None}


def read_certified_pairs(path: str | os.PathLike) -> list[CertifiedPair]:
    """The pairs a ``certificate.json`` covers (cross cells of its candidates, then self cells)."""
    path = Path(path)
    try:
        cert = json.loads(path.read_text())
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such certificate") from None
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: not a readable certificate ({exc})") from None
    if not isinstance(cert, dict) or cert.get("format") != FORMAT:
        raise CertificateError(f"{path}: not a facecompat certificate (format {cert.get('format')!r})"
                               if isinstance(cert, dict) else f"{path}: not a facecompat certificate")
    versions = cert.get("versions") or {}
    if not versions:
        raise CertificateError(f"{path}: made from precomputed features, it names no model versions a "
                               "store could match")
    pairs, source = [], str(path)
    for c in cert["candidates"]:
        cell = cert["cross_cells"][c]
        query, gallery = cell.split("|")
        d = cert["decision"][c]
        pairs.append(CertifiedPair(versions[query], versions[gallery], cell, c, d["decision"], d["far"],
                                   _thresholds(cert, cell), source))
    for cell in cert["cells"]:
        query, gallery = cell.split("|")
        if query == gallery and query in versions:
            pairs.append(CertifiedPair(versions[query], versions[gallery], cell, None, "self",
                                       cert["operating_far"], _thresholds(cert, cell), source))
    return pairs


def pair_for(pairs: Sequence[CertifiedPair], query: str, gallery: str) -> CertifiedPair | None:
    """The pair of ``query`` against ``gallery`` (store version ids), or None when no certificate has it."""
    return next((p for p in pairs if (p.query, p.gallery) == (query, gallery)), None)


__all__ = ["CertificateError", "CertifiedPair", "pair_for", "read_certified_pairs"]
