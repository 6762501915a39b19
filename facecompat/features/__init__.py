"""Features: the one embedding engine, the old-feature bank and its class statistics.

The layer between the models and their users: compatibility training reads the bank, evaluation
and verification embed with the engine. It imports only the layers below (data, models, heads and
the foundations), never compat, train, eval or index.

- :mod:`facecompat.features.engine`: :func:`embed_batches` (uint8 batches → one float32 device
  buffer, flip fusion, no host sync per batch), :func:`fuse_flip`, :func:`inference_loader`,
  :func:`default_num_workers`; the one input normalisation
  (:func:`~facecompat.data.normalize.normalize_images`) lives in the data layer below, re-exported here;
- :mod:`facecompat.features.bank`: the bank's format and :class:`FeatureBank`;
- :mod:`facecompat.features.bank_stats`: class statistics (means, angles, AdvBCT boundaries, MixBCT
  credible masks);
- :mod:`facecompat.features.bank_build`: :func:`build_bank` / :func:`ensure_bank`, resumable
  collective extraction.
"""

from facecompat.data.normalize import normalize_images
from facecompat.features.bank import BankError, FeatureBank, default_bank_dir
from facecompat.features.bank_build import build_bank, ensure_bank
from facecompat.features.bank_stats import ClassStats, fenced_max, fuse, keep_counts
from facecompat.features.engine import default_num_workers, embed_batches, fuse_flip, inference_loader

__all__ = [
    "BankError",
    "ClassStats",
    "FeatureBank",
    "build_bank",
    "default_bank_dir",
    "default_num_workers",
    "embed_batches",
    "ensure_bank",
    "fenced_max",
    "fuse",
    "fuse_flip",
    "inference_loader",
    "keep_counts",
    "normalize_images",
]
