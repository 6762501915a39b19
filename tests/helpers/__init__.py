"""Helpers shared by the test files, one module per concept. A test file imports what it shares
from here (``from tests.helpers.tools import load_tool``), never from another test file.

- ``tools``: a ``tools/*.py`` script in this process or in a subprocess, its exit status, its help
- ``errors``: one-line errors, raised by the library or printed by a tool
- ``dist``: a function run in N gloo processes, a free local port
- ``models``: backbones with trained-like output scales, run directories and their specs, one math
  thread
- ``data``: generated recs, a small synthetic spec, per-subject IJB-C features, the channels_last check
- ``train``: a tiny experiment config over generated data
- ``compat``: the compatibility tests' config, bank and context builders
- ``fct``: planted FCT banks and the config that trains a transformation on them
- ``gallery``: random-weight runs, untrained transformations naming them, feature stores and an
  evaluation catalog, for the gallery, backfill and catalog tests
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
# The recordio and verification fixtures, shared by the checkouts beside this one.
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
