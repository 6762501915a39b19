"""facecompat.features: the embedding engine and the old-feature bank."""
