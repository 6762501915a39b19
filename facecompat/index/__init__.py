"""Gallery side of a model upgrade: a versioned feature store, a faiss index and partial backfilling.

- :mod:`~facecompat.index.store`: gallery vectors on disk with the model or transformation that made
  each one, and the rule for which queries may be compared with them.
- :mod:`~facecompat.index.gallery`: faiss cosine search (exact or IVF, CPU or GPU) with row replacement.
- :mod:`~facecompat.index.backfill`: the IJB 1:N metric as the gallery is re-embedded in some order.
- :mod:`~facecompat.index.upgrade`: stores from model features, FCT upgrades of a store, backfilled rows.

faiss is imported only when an index is built (``pip install faiss-cpu`` or ``faiss-gpu``).
"""

from facecompat.index.store import (
    FeatureStore,
    IncompatibleError,
    StoreError,
    check_comparable,
    model_version,
    model_version_id,
    transform_version,
    transform_version_id,
    version_space,
)

__all__ = ["FeatureStore", "IncompatibleError", "StoreError", "check_comparable", "model_version",
           "model_version_id", "transform_version", "transform_version_id", "version_space"]
