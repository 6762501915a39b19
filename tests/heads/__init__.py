"""facecompat.heads: margins and Partial FC."""
