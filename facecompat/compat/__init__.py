"""Compatibility methods (BCT, L2, MixBCT, LCE, AdvBCT) as trainer plug-ins, FCT, and what they read.

Importing the package registers the built-in methods (:mod:`facecompat.compat.registry`).
"""

from facecompat.compat import advbct, bct, l2, lce, mixbct  # noqa: F401  (they register themselves)
