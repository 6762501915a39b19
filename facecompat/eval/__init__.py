"""Evaluation: face alignment, feature extraction, IJB and verification benchmarks."""
