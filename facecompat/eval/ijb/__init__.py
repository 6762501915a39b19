"""IJB-C / IJB-B protocols: meta files, template pooling, 1:1 pair scores and 1:N search.

The folder layout is DESIGN §4 (``<target folder>/meta/<prefix>_*``, prefix ``ijbc``/``ijbb``;
:func:`find_target_dir` finds that folder).
The face order of every feature array is the line order of ``meta/<prefix>_name_5pts_score.txt``
(DESIGN §8); templates and media join it by image name, never by line number. Numbers follow
insightface's ``eval_ijbc.py`` (DESIGN §5): face feature (flip-fused, unnormalised) x detector
score, media = mean of its faces, template = sum of its media, L2-normalised, score = cosine.

Large files have vectorised fast paths that read the bytes with numpy in ~1 MB chunks, with no
per-value Python: the names column is cut off by :func:`_split_names`; integers (pair and
template/media files) are read 8 digits per gather (:func:`_uint_chunk`); plain decimals (the
5-point file) as two such digit runs around the dot, giving exactly ``float(token)``
(:func:`_decimal_chunk`); the 1:N CSVs by cutting fields at commas (:func:`_subject_csv_fast`).
Anything a fast path does not expect (signs, exponents, quotes, non-ASCII names, wrong column
counts) goes to a general path (``np.fromstring`` once line widths are checked, or the csv
module), and a bad line to a line-by-line pass whose :class:`IJBMetaError` names file and line.

1:N computes each gallery's full probe x gallery similarity matrix (faiss on a GPU, else one BLAS
product) and reads CMC and TPIR@FPIR from one blocked pass over it (:func:`metrics.identification`).
"""

from facecompat.eval.ijb.identify import evaluate_1toN, identify_1toN
from facecompat.eval.ijb.meta import META_CACHE_VERSION, find_target_dir, load_ijb_meta
from facecompat.eval.ijb.pooling import Pooled, pool, pool_templates
from facecompat.eval.ijb.records import GALLERY_NAMES, IJBMeta, IJBMetaError, Subjects
from facecompat.eval.ijb.scan import _parse_decimal_fast, _parse_uint_fast
from facecompat.eval.ijb.tables import (
    _parse_int_table,
    _parse_named_table,
    _parse_subject_csv,
    _read_text,
    _subject_csv_fast,
    _subject_csv_rows,
    _subjects,
)
from facecompat.eval.ijb.verify import evaluate_1to1, score_pairs, tar_from_scores, verify_1to1

__all__ = [
    "GALLERY_NAMES", "META_CACHE_VERSION", "IJBMeta", "IJBMetaError", "Pooled", "Subjects",
    "_parse_decimal_fast", "_parse_int_table", "_parse_named_table", "_parse_subject_csv", "_parse_uint_fast",
    "_read_text", "_subject_csv_fast", "_subject_csv_rows", "_subjects", "evaluate_1to1", "evaluate_1toN",
    "find_target_dir", "identify_1toN", "load_ijb_meta", "pool", "pool_templates", "score_pairs",
    "tar_from_scores", "verify_1to1",
]
