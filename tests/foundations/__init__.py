"""facecompat's foundations: config, dist, fileio, cli, errors, rng, checkpoint."""
