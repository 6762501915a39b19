"""Speed of the IJB-C 1:1 evaluation after feature extraction, at IJB-C size.

    python tools/bench_ijbc.py [--data-dir DIR] [--pairs N] [--reference] [--json]

Writes an IJB-C-sized meta folder (469,375 faces, 23,124 templates, 15,658,489 pairs of which
19,557 genuine; random subjects, templates and media, consistent with each other; 1:N CSVs with
1,772 G1 and 1,759 G2 gallery templates of disjoint subjects and 19,593 probe templates) into DIR
(a temporary folder by default; reused when DIR already holds one of the same size and version),
makes random 512-d float32 features weakly tied to the subjects, then times facecompat's phases:

  parse_s    load_ijb_meta (the three 1:1 meta files and the three 1:N CSVs); each parser is
             then timed again on its own (parse_parts_s)
  pool_s     ijb.pool (detector-score weighting, media mean, template sum, L2)
  score_s    meta.pair_rows (template id -> row by a lookup table) + score_pairs over all pairs
  roc_s      roc_curve, then TAR@FAR (nearest and strict) with the pairs near each target FAR
             re-scored in float64 (ijb.tar_from_scores) + auc
  total_s    pool + score + roc (what insightface's 124 s in DESIGN §7 covers): the calls that
             ijb.verify_1to1(meta, pooled) makes, timed one by one
  verify_s   ijb.pool + ijb.verify_1to1 called as such (pair-row cache emptied): total_s measured
             as one call; its result must equal the phases'
  peak_rss_mb  peak resident memory of this process after those phases
  parse_cached_s  load_ijb_meta again with a meta cache (what every later evaluation pays)
  one_n_s    identify_1toN on the pooled templates (similarity matrix per gallery, then CMC and
             TPIR@FPIR from one pass over it); reported apart, not part of total_s

torch is imported before timing: facecompat's pair scores and parser use it, and an evaluation
process has it loaded for feature extraction anyway.

--reference also times an insightface eval_ijbc.py-style implementation in the same run (Python
loops over templates and media for pooling into float64 templates, pair scores in batches of
100,000 by row gather and multiply-sum, sklearn's argsort-based ROC algorithm, TAR read from the
flipped ROC by min(zip(...))), prints the speed-up and checks that the TAR@FAR values agree.
--cross checks the cross-model test instead of timing: a second "new" feature set (the first plus
noise), then `tools/eval_ijbc.py --query-features NEW.npy --gallery-features OLD.npy --no-1n` as a
user runs it, against the public cross-model evaluator's verification_11(old templates, ..., new
templates, ..., p1, p2) written the reference way (old-model templates in the pair file's first
column, new-model ones in the second); every TAR@FAR must be identical (exit status 1 if not).
--pairs N scales the pair count down for quick checks (genuine pairs scaled alike).
--json prints the results as JSON instead of the table; --json OUT writes them to OUT beside it.
Exit status 2 with a one-line reason on bad input (checked before the work: --pairs under 100,
a --data-dir or --json that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facecompat.cli import OneLineParser, add_json_arg, output_dir, run_main
from facecompat.errors import UserError

if TYPE_CHECKING:  # torch and facecompat.eval are imported after parsing: --help stays fast
    from facecompat.eval import ijb

FULL = {"faces": 469_375, "templates": 23_124, "pairs": 15_658_489, "genuine": 19_557, "subjects": 3_500}
DIM = 512
META_VERSION = 2  # bump when make_meta's output changes: an older folder is rewritten
GALLERY_SIZES = {"G1": 1_772, "G2": 1_759}
MIN_PAIRS = 100


class BenchError(UserError, RuntimeError):
    """Bad input (or an unwritable --data-dir) the tool reports in one line (exit status 2)."""


def _int_lines(columns: list[np.ndarray]) -> bytes:
    """Space-separated non-negative integer columns as text, vectorised (fixed width, space padded)."""
    cells = []
    for col in columns:
        width = len(str(int(col.max()))) if col.size else 1
        digits = np.full((col.size, width + 1), ord(" "), np.uint8)
        value = col.astype(np.int64)
        for k in range(width):
            d = (value % 10).astype(np.uint8) + ord("0")
            digits[:, width - 1 - k] = np.where((value > 0) | (k == 0), d, ord(" "))
            value //= 10
        cells.append(digits)
    cells[-1][:, -1] = ord("\n")
    return np.concatenate(cells, axis=1).tobytes()


def make_meta(out: Path, num_pairs: int, num_genuine: int, seed: int = 0) -> None:
    """Write ``out/IJBC/meta`` (1:1 files and 1:N CSVs) of IJB-C size with ``num_pairs`` pairs."""
    rng = np.random.default_rng(seed)
    meta = out / "IJBC" / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    n, t = FULL["faces"], FULL["templates"]
    num_subjects = FULL["subjects"]
    template_subject = rng.integers(0, num_subjects, t)
    face_template = np.concatenate([np.arange(t), rng.integers(0, t, n - t)])
    rng.shuffle(face_template)
    media_per_template = rng.integers(1, 8, t)
    face_media = face_template * 10 + rng.integers(0, 8, n) % media_per_template[face_template]
    names = [f"{i + 1}.jpg" for i in range(n)]
    tid_mid = _int_lines([face_template + 1, face_media + 1]).splitlines(True)
    (meta / "ijbc_face_tid_mid.txt").write_bytes(b"".join(f"{a} ".encode() + b
                                                          for a, b in zip(names, tid_mid)))
    pts = rng.uniform(20, 90, (n, 10))
    score = rng.uniform(0.3, 1.0, n)
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(
        f"{a} {' '.join(f'{v:.3f}' for v in p)} {s:.5f}\n"
        for a, p, s in zip(names, pts.tolist(), score.tolist())))
    # genuine pairs: two templates of one subject; impostor pairs: random templates of two subjects
    by_subject = np.argsort(template_subject, kind="stable")
    starts = np.searchsorted(template_subject[by_subject], np.arange(num_subjects))
    sizes = np.diff(np.r_[starts, t])
    subj = rng.choice(np.flatnonzero(sizes >= 2), num_genuine)
    a = rng.integers(0, sizes[subj])
    b = (a + rng.integers(1, np.maximum(sizes[subj], 2))) % sizes[subj]
    g1, g2 = by_subject[starts[subj] + a], by_subject[starts[subj] + b]
    i1, i2 = rng.integers(0, t, num_pairs - num_genuine), rng.integers(0, t, num_pairs - num_genuine)
    same = template_subject[i1] == template_subject[i2]
    i2[same] = (i2[same] + 1) % t  # rarely still the same subject: a harmless mislabel
    t1, t2 = np.r_[g1, i1] + 1, np.r_[g2, i2] + 1
    labels = np.r_[np.ones(num_genuine, np.int64), np.zeros(num_pairs - num_genuine, np.int64)]
    order = rng.permutation(num_pairs)
    with open(meta / "ijbc_template_pair_label.txt", "wb") as f:
        for s in range(0, num_pairs, 2_000_000):
            sel = order[s:s + 2_000_000]
            f.write(_int_lines([t1[sel], t2[sel], labels[sel]]))
    np.save(meta / "bench_template_subject.npy", template_subject)
    _write_1n_csvs(meta, rng, template_subject, face_template, names)
    (meta / "bench.json").write_text(json.dumps({"pairs": num_pairs, "genuine": num_genuine, "seed": seed,
                                                 "version": META_VERSION}))


def _write_1n_csvs(meta: Path, rng: np.random.Generator, template_subject: np.ndarray,
                   face_template: np.ndarray, names: list[str]) -> None:
    """IJB-C-shaped 1:N CSVs: G1 and G2 take templates of two disjoint halves of the subjects (each
    subject's first template before any second one), every other template is a probe; one row per
    face (TEMPLATE_ID,SUBJECT_ID,FILENAME), ids 1-based like the pair file."""
    t = template_subject.size
    half = rng.permutation(template_subject.max() + 1) % 2  # subject -> gallery 0 (G1) or 1 (G2)
    order = rng.permutation(t)
    order = order[np.argsort(template_subject[order], kind="stable")]  # random within each subject
    first_of_subject = np.r_[True, template_subject[order][1:] != template_subject[order][:-1]]
    group = np.full(t, -1)  # -1 probe, 0 G1, 1 G2
    for g, size in enumerate(GALLERY_SIZES.values()):
        mine = order[half[template_subject[order]] == g]
        firsts = first_of_subject[half[template_subject[order]] == g]
        chosen = np.r_[mine[firsts], mine[~firsts]][:size]
        group[chosen] = g
    face_group = group[face_template]
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    files = {0: "ijbc_1N_gallery_G1.csv", 1: "ijbc_1N_gallery_G2.csv", -1: "ijbc_1N_probe_mixed.csv"}
    for g, name in files.items():
        faces = np.flatnonzero(face_group == g)
        tids = face_template[faces]
        rows = [f"{a},{b},{names[c]}\n" for a, b, c in
                zip((tids + 1).tolist(), template_subject[tids].tolist(), faces.tolist())]
        (meta / name).write_text(header + "".join(rows))


def make_features(meta: ijb.IJBMeta, subject_of_template: np.ndarray, seed: int = 1) -> np.ndarray:
    """[N, 512] float32: a subject centre (weight 0.1) plus unit Gaussian noise, chunk by chunk.

    The weight makes genuine template cosines ~0.17 against impostor ~0 +- 0.044: TARs in (0, 1)
    at the small FARs, so the agreement check against the reference means something.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((subject_of_template.max() + 1, DIM), dtype=np.float32)
    feats = np.empty((meta.num_faces, DIM), np.float32)
    for s in range(0, meta.num_faces, 65_536):
        e = min(s + 65_536, meta.num_faces)
        rng.standard_normal((e - s, DIM), dtype=np.float32, out=feats[s:e])
        feats[s:e] += 0.1 * centres[subject_of_template[meta.template_ids[s:e] - 1]]
    return feats


# ------------------------------------------------------------------- insightface-style reference
def reference_pool(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                   scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """insightface image2template_feature (with use_detector_score), loop for loop.

    Like insightface, faces are weighted in float32 and the template array is numpy's default
    float64 (``np.zeros((T, D))``), so templates and pair scores are float64 from here on.
    """
    from tqdm import tqdm

    feats = feats * scores.astype(np.float32)[:, None]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), feats.shape[1]))
    for k, uqt in enumerate(tqdm(unique_templates, desc="reference pooling", leave=False, mininterval=5)):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        unique_medias, counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for u, ct in zip(unique_medias, counts):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(face_feats[ind_m] if ct == 1 else np.mean(face_feats[ind_m], 0, keepdims=True))
        template_feats[k] = np.sum(np.array(media_feats), axis=0)
    norms = np.linalg.norm(template_feats, axis=1, keepdims=True)
    return unique_templates, template_feats / np.maximum(norms, 1e-12)


def reference_scores(template_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray,
                     p2: np.ndarray, template_feats2: np.ndarray | None = None) -> np.ndarray:
    """insightface verification(): row gathers + multiply-sum in batches of 100,000 pairs. With
    ``template_feats2`` the cross-model evaluator's verification_11: ``p1`` from the first array
    (the gallery model), ``p2`` from the second (the query model), same template order."""
    from tqdm import tqdm

    second = template_feats if template_feats2 is None else template_feats2
    template2id = np.zeros(max(unique_templates) + 1, dtype=int)
    template2id[unique_templates] = np.arange(len(unique_templates))
    score = np.zeros(len(p1))
    for s in tqdm(range(0, len(p1), 100_000), desc="reference scores", leave=False, mininterval=5):
        sel = slice(s, s + 100_000)
        score[sel] = np.sum(template_feats[template2id[p1[sel]]] * second[template2id[p2[sel]]], -1)
    return score


def reference_tar(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, float]:
    """insightface's printed TAR@FAR: flip the ROC, then the first of min(zip(|fpr - far|, index))."""
    from facecompat.eval import metrics

    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in metrics.DEFAULT_FARS:
        _, best = min(zip(abs(fpr - far), range(len(fpr))))
        out[metrics.far_key(far)] = float(tpr[best])
    return out


def reference_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's roc_curve algorithm (one mergesort argsort of all scores)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order].astype(np.float64)
    idx = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    fps, tps = np.r_[0, fps[keep]], np.r_[0, tps[keep]]
    return fps / fps[-1], tps / tps[-1]


# ---------------------------------------------------------------------------------- cross check
def make_new_features(old: np.ndarray, seed: int = 2, noise: float = 0.7) -> np.ndarray:
    """A "new model": the old features plus Gaussian noise, chunk by chunk. Cross scores then sit
    between the self tests' and the two directions of a pair give different scores."""
    rng = np.random.default_rng(seed)
    new = np.empty_like(old)
    for s in range(0, old.shape[0], 65_536):
        e = min(s + 65_536, old.shape[0])
        rng.standard_normal((e - s, old.shape[1]), dtype=np.float32, out=new[s:e])
        new[s:e] *= np.float32(noise)
        new[s:e] += old[s:e]
    return new


def cross_check(data_dir: Path, meta: ijb.IJBMeta, old: np.ndarray, new: np.ndarray) -> dict:
    """tools/eval_ijbc.py with --query-features NEW --gallery-features OLD against verification_11."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_ijbc_tool", Path(__file__).with_name("eval_ijbc.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    work = data_dir / "cross"
    work.mkdir(exist_ok=True)
    np.save(work / "old.npy", old)
    np.save(work / "new.npy", new)
    t0 = time.perf_counter()
    code = tool.main(["--query-features", str(work / "new.npy"), "--gallery-features", str(work / "old.npy"),
                      "--data-root", str(data_dir), "--target", "IJBC", "--no-1n",
                      "--cache-dir", str(work / "cache"), "--json", str(work / "result.json")])
    tool_s = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"eval_ijbc.py exited with {code}")
    result = json.loads((work / "result.json").read_text())
    ours = result["matrix"]["new|old"]["1:1"]["tar_at_far"]
    t0 = time.perf_counter()
    ref_t, ref_old = reference_pool(old, meta.template_ids, meta.media_ids, meta.det_scores)
    _, ref_new = reference_pool(new, meta.template_ids, meta.media_ids, meta.det_scores)
    ref_scores = reference_scores(ref_old, ref_t, meta.pair_t1, meta.pair_t2, ref_new)
    head = slice(0, 100_000)  # the other direction, on a sample: how much the choice of direction matters
    reversed_scores = reference_scores(ref_new, ref_t, meta.pair_t1[head], meta.pair_t2[head], ref_old)
    ref_tar = reference_tar(*reference_roc(ref_scores, meta.pair_labels))
    return {"tar_at_far": ours, "reference_tar_at_far": ref_tar, "tool_s": tool_s,
            "reference_s": time.perf_counter() - t0,
            "tar_agree_abs": max(abs(ref_tar[k] - ours[k]) for k in ours),
            "direction_score_diff": float(np.abs(reversed_scores - ref_scores[head]).max())}


# ------------------------------------------------------------------------------------------ run
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _parse_parts(meta_dir: Path) -> dict[str, float]:
    """Seconds of each parser of load_ijb_meta, called again one by one (files in the page cache)."""
    from facecompat.eval import ijb

    parts = {}
    calls = {"5-point file": lambda: ijb._parse_named_table(meta_dir / "ijbc_name_5pts_score.txt", 12, float),
             "face/template/media file": lambda: ijb._parse_named_table(meta_dir / "ijbc_face_tid_mid.txt",
                                                                        3, int),
             "pair file": lambda: ijb._parse_int_table(meta_dir / "ijbc_template_pair_label.txt", 3),
             "1:N CSVs": lambda: [ijb._parse_subject_csv(p) for p in sorted(meta_dir.glob("ijbc_1N_*.csv"))]}
    for label, call in calls.items():
        t0 = time.perf_counter()
        call()
        parts[label] = time.perf_counter() - t0
    return parts


def run(data_dir: Path, num_pairs: int, reference: bool, cross: bool = False) -> dict:
    import torch  # noqa: F401  (loaded before timing; see the module docstring)

    from facecompat.eval import ijb, metrics

    info = data_dir / "IJBC" / "meta" / "bench.json"
    num_genuine = max(1, round(FULL["genuine"] * num_pairs / FULL["pairs"]))
    stored = json.loads(info.read_text()) if info.is_file() else {}
    if stored.get("pairs") != num_pairs or stored.get("version") != META_VERSION:
        print(f"writing an IJB-C-sized meta folder with {num_pairs:,} pairs to {data_dir}", file=sys.stderr)
        # in a child process, so that this process's peak RSS is the evaluation's alone
        child = multiprocessing.get_context("fork").Process(target=make_meta,
                                                            args=(data_dir, num_pairs, num_genuine))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise BenchError(f"--data-dir {data_dir}: writing the meta folder failed (exit {child.exitcode})")
    out: dict = {"faces": FULL["faces"], "templates": FULL["templates"], "pairs": num_pairs}
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    meta = ijb.load_ijb_meta(data_dir, "IJBC")
    out["parse_s"] = time.perf_counter() - t0
    meta_dir = ijb.find_target_dir(data_dir, "IJBC") / "meta"  # the folder load_ijb_meta read
    subjects = np.load(meta_dir / "bench_template_subject.npy")
    if cross:  # a check, not a timing: none of the parser timings below
        feats = make_features(meta, subjects)
        return {**out, "genuine": int(meta.pair_labels.sum()),
                "cross": cross_check(data_dir, meta, feats, make_new_features(feats))}
    out["parse_parts_s"] = _parse_parts(meta_dir)
    with tempfile.TemporaryDirectory(prefix="bench_ijbc_cache_") as cache:  # what a repeated run pays
        ijb.load_ijb_meta(data_dir, "IJBC", cache_dir=cache)
        t0 = time.perf_counter()
        ijb.load_ijb_meta(data_dir, "IJBC", cache_dir=cache)
        out["parse_cached_s"] = time.perf_counter() - t0
    feats = make_features(meta, subjects)
    # the phases are the calls of ijb.verify_1to1(meta, pooled), one by one
    t0 = time.perf_counter()
    pooled = ijb.pool(meta, feats)
    t1 = time.perf_counter()
    rows1, rows2 = meta.pair_rows(pooled.templates)  # template id -> row by a lookup table
    scores = ijb.score_pairs(pooled.feats, pooled.feats, rows1, rows2)
    t2 = time.perf_counter()
    fpr, tpr, thresholds = metrics.roc_curve(scores, meta.pair_labels)
    # float32 scores, then the pairs near each target FAR re-scored in float64 (insightface's values)
    tar, out["tar_at_far_strict"] = ijb.tar_from_scores(meta, pooled, pooled, scores, rows1, rows2,
                                                         fpr, tpr, thresholds)
    out["auc"] = metrics.auc(fpr, tpr)
    t3 = time.perf_counter()
    out.update(pool_s=t1 - t0, score_s=t2 - t1, roc_s=t3 - t2, total_s=t3 - t0, tar_at_far=tar,
               genuine=int(meta.pair_labels.sum()), peak_rss_mb=_peak_rss_mb(), rss_before_mb=rss_before)
    del rows1, rows2
    # the real function end to end (pooling included), with the pair-row cache emptied so that it
    # does the lookup again: the sum of the phases above, measured as one call
    meta.clear_cache()
    t0 = time.perf_counter()
    result = ijb.verify_1to1(meta, ijb.pool(meta, feats))
    out["verify_s"] = time.perf_counter() - t0
    if result["tar_at_far"] != tar or result["auc"] != out["auc"]:
        raise RuntimeError("verify_1to1 disagrees with its phases timed one by one")
    if meta.has_1n:
        t0 = time.perf_counter()
        one_n = ijb.identify_1toN(meta, pooled)
        out["one_n_s"] = time.perf_counter() - t0
        out["one_n"] = one_n
        out["peak_rss_1n_mb"] = _peak_rss_mb()
    if reference:
        t0 = time.perf_counter()
        ref_t, ref_feats = reference_pool(feats, meta.template_ids, meta.media_ids, meta.det_scores)
        t1 = time.perf_counter()
        ref_scores = reference_scores(ref_feats, ref_t, meta.pair_t1, meta.pair_t2)
        t2 = time.perf_counter()
        ref_fpr, ref_tpr = reference_roc(ref_scores, meta.pair_labels)
        ref_tar = reference_tar(ref_fpr, ref_tpr)
        t3 = time.perf_counter()
        out["reference"] = {"pool_s": t1 - t0, "score_s": t2 - t1, "roc_s": t3 - t2, "total_s": t3 - t0,
                            "tar_at_far": ref_tar}
        out["speedup"] = out["reference"]["total_s"] / out["total_s"]
        out["max_score_diff"] = float(np.max(np.abs(ref_scores - scores)))
        if not np.array_equal(ref_t, pooled.templates):
            raise RuntimeError("the reference pooled other templates")
        out["tar_agree_abs"] = max(abs(ref_tar[k] - tar[k]) for k in tar)
    return out


def _table(res: dict) -> str:
    rows = [("parse meta", "parse_s"), ("pooling", "pool_s"), ("pair scores", "score_s"),
            ("ROC + TAR@FAR", "roc_s"), ("total after parse", "total_s"),
            ("verify_1to1 (end to end)", "verify_s")]
    ref = res.get("reference")
    lines = [f"IJB-C 1:1 bench: {res['faces']:,} faces, {res['templates']:,} templates, "
             f"{res['pairs']:,} pairs ({res['genuine']:,} genuine)",
             f"{'phase':<26}{'facecompat s':>14}" + (f"{'reference s':>14}{'speed-up':>10}" if ref else "")]
    for label, key in rows:
        line = f"{label:<26}{res[key]:>14.2f}"
        if ref and key in ref:
            line += f"{ref[key]:>14.2f}{ref[key] / max(res[key], 1e-9):>9.1f}x"
        lines.append(line)
    lines.append("parse meta by file (again, one by one): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in res["parse_parts_s"].items()))
    lines.append(f"parse meta from the meta cache (every later run): {res['parse_cached_s']:.2f} s")
    lines.append(f"peak RSS {res['peak_rss_mb']:.0f} MB (after facecompat phases; "
                 f"{res['rss_before_mb']:.0f} MB before parsing)")
    if "one_n_s" in res:
        sizes = ", ".join(f"{g} {r['num_gallery']:,}" for g, r in res["one_n"].items())
        rank1 = " ".join(f"{g}:{r['cmc']['1']:.4f}" for g, r in res["one_n"].items())
        probes = next(iter(res["one_n"].values()))["num_probes"]
        lines.append(f"1:N identify_1toN {res['one_n_s']:.2f} s ({probes:,} probes; galleries {sizes}; "
                     f"rank-1 {rank1}; not in the total; peak RSS then {res['peak_rss_1n_mb']:.0f} MB)")
    lines.append("TAR@FAR " + " ".join(f"{k}:{v:.4f}" for k, v in res["tar_at_far"].items()))
    if ref:
        lines.append(f"reference agrees: max |TAR diff| {res['tar_agree_abs']:.2e}, "
                     f"max |score diff| {res['max_score_diff']:.2e}")
    return "\n".join(lines)


def _cross_table(res: dict) -> str:
    cross, ref = res["cross"], res["cross"]["reference_tar_at_far"]
    lines = [f"IJB-C cross test new|old: {res['faces']:,} faces, {res['pairs']:,} pairs "
             f"({res['genuine']:,} genuine)", f"{'FAR':<8}{'eval_ijbc.py':>14}{'verification_11':>17}"]
    lines += [f"{k:<8}{v:>14.6f}{ref[k]:>17.6f}" for k, v in cross["tar_at_far"].items()]
    verdict = "identical" if cross["tar_agree_abs"] == 0 else "DIFFER"
    lines.append(f"max |TAR diff| {cross['tar_agree_abs']:.2e} ({verdict}); "
                 f"the reversed direction moves pair scores by up to {cross['direction_score_diff']:.3f}; "
                 f"eval_ijbc.py {cross['tool_s']:.1f} s (4 cells), reference {cross['reference_s']:.1f} s")
    return "\n".join(lines)


def _pairs(text: str) -> int:
    """argparse type: a pair count >= MIN_PAIRS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < MIN_PAIRS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_PAIRS}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bench_ijbc.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data-dir", type=output_dir, metavar="DIR",
                        help="where the meta folder is written/reused (default: temp)")
    parser.add_argument("--pairs", type=_pairs, default=FULL["pairs"], metavar="N",
                        help=f"number of 1:1 pairs (at least {MIN_PAIRS}; default {FULL['pairs']:,})")
    parser.add_argument("--reference", action="store_true", help="also time the insightface-style code")
    parser.add_argument("--cross", action="store_true",
                        help="check eval_ijbc.py's cross test against verification_11 instead of timing")
    add_json_arg(parser, "the results (instead of the table)")
    return parser


def bench(args: argparse.Namespace) -> int:
    """Run the bench (or the cross check) in --data-dir or a temporary folder; print and write the results."""
    from facecompat.cli import write_json

    if args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix="bench_ijbc_") as tmp:
            res = run(Path(tmp), args.pairs, args.reference, args.cross)
    else:
        res = run(args.data_dir, args.pairs, args.reference, args.cross)
    write_json(res, args.json)
    if args.json is None or str(args.json) != "-":
        print(_cross_table(res) if args.cross else _table(res))
    if args.cross:
        return 0 if res["cross"]["tar_agree_abs"] == 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("bench_ijbc.py", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
