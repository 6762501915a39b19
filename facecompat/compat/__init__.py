"""Compatibility methods (BCT, L2, MixBCT, LCE, AdvBCT) as trainer plug-ins, and FCT.

What they read, the old-feature bank and its class statistics, is in :mod:`facecompat.features`.

Importing the package registers the built-in methods (:mod:`facecompat.compat.registry`).
"""

from facecompat.compat import advbct, bct, l2, lce, mixbct  # noqa: F401  (they register themselves)
