"""facecompat.data: records, loaders, alignment, splits, generated data sets."""
