"""facecompat.compat: the compatibility methods, FCT, the protocols."""
