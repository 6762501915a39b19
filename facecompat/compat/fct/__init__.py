"""Forward-compatible transformation (FCT, Ramanujan et al. 2022; FastFill, Jaeckle et al. 2023): the
network h, its loss and the saved artefact (``config.py``, ``network.py``, ``transform.py``).

When the new model arrives, the stored gallery is upgraded by a small network instead of re-running
the new model on every image: ``h(φ_old(x), ψ(x)) ≈ φ_new(x)``, with ψ the side-information model
trained (self-supervised) together with the old model and stored with the gallery.

    python tools/train_fct.py configs/synthetic_fct.yaml         # or torchrun ... (facecompat.train.fct)
    transform = FCTransform.load("work_dirs/synthetic_fct")
    upgraded, uncertainty = transform.apply(old_feats, side_feats)

**Training** (:mod:`facecompat.train.fct`, one layer up: it reuses the trainer's schedule) runs on
cached features of the new model's training set: the old, side-information and new models' feature
banks of that view, three rows per record (image, flip, fused).

**The network** (:class:`Transformation`): inputs L2-normalised and concatenated
``[φ̂_old, ψ̂]`` (``ψ`` omitted in the no-side-info variant), then per hidden width
``Linear → LayerNorm → ReLU``, then ``Linear`` to the new dimension. LayerNorm, not BatchNorm:
its output does not depend on the batch or on the rank, so every rank holds the same model and a
transformation applies the same way to one vector or a million. With ``uncertainty`` a second
linear output gives ``s = log σ²`` per item (FastFill).

**Loss** (per row, ``t`` the L2-normalised new feature, ``p`` the prediction, ``e = ‖p − t‖²``):
``mse = e``; ``cosine = 1 − cos(p, t)`` weighted by ``cosine_weight``; with uncertainty the
Gaussian negative log-likelihood of an isotropic σ² over ``D`` dimensions,
``nll = ½ (e / σ² + D · s)`` with ``e`` detached: the mean is trained by the squared error alone
and σ² learns the expected error of each item (its minimiser is ``σ² = e / D``), which is what
FastFill orders the backfill by. Each term is a mean over the rows of the global batch (every
rank's share averaged).

**Output scale**: h predicts directions (unit targets), but evaluation pools per-face features
*unnormalised* (insightface's protocol: a face's norm weighs it in its template), and a partially
backfilled gallery mixes transformed faces with the new model's own. :meth:`FCTransform.apply`
therefore scales h's output by ``output_norm``, the mean norm of the new model's fused training
features (stored in ``fct.json``), so a transformed face weighs what an average new-model face
weighs instead of 1/20th of it.

**The artefact** is a directory: ``transform.pt`` (the state dict), ``fct.json`` (widths, the
three models' names, paths and weight fingerprints, the training summary and its cost), written
last and atomically, and ``metrics.jsonl``. :meth:`FCTransform.load` refuses a transformation whose
old or side-information model is not the one given (fingerprints differ).
"""

from facecompat.compat.fct.config import FCTConfig, FCTError, FCTTrainConfig, TransformConfig, load_fct_config
from facecompat.compat.fct.network import Transformation, fct_losses
from facecompat.compat.fct.transform import (
    APPLY_CHUNK_ROWS,
    FORMAT,
    META,
    METRICS,
    WEIGHTS,
    FCTransform,
    model_record,
    save_transformation,
)

__all__ = ["APPLY_CHUNK_ROWS", "FCTConfig", "FCTError", "FCTTrainConfig", "FCTransform", "FORMAT", "META",
           "METRICS", "Transformation", "TransformConfig", "WEIGHTS", "fct_losses", "load_fct_config",
           "model_record", "save_transformation"]
