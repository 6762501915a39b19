"""Compatibility methods (BCT, L2, MixBCT, LCE, AdvBCT) and the old-feature bank they read."""
