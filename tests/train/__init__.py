"""facecompat.train: the trainer and its parts, contrastive training, benchmarks."""
