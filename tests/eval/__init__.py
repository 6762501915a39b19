"""facecompat.eval: extraction, verification, IJB-C, metrics and the cross-model matrix."""
