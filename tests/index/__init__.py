"""facecompat.index: feature stores, the faiss gallery, upgrades and backfilling."""
