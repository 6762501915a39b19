"""Pipelines: the jobs composed from the layers below (train, eval, index).

- :mod:`facecompat.pipelines.evaluate`: the IJB-C / IJB-B evaluation, its matrix and verdicts
  (``tools/eval_ijbc.py`` and the quickstart's evaluate stage).
- :mod:`facecompat.pipelines.quickstart`: the main job end to end on generated data.
"""
