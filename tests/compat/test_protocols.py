"""Every compatibility method under every protocol on awkward data (DESIGN §6, "protocol edge cases").

The data: ``tools/make_synthetic.py --imgs-per-id 1:4`` (identities with one image, which OPdata cannot
split by images) narrowed by a record-id list that drops every image of one identity, so the views that
keep the dataset's labels (OPdata, EXclass/EXdata's new part) have a class id without any image. One
old model is trained once for the module; each (method, protocol) then trains a couple of steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from facecompat.compat import registry
from facecompat.compat.build import build_compat
from facecompat.config import load_config
from facecompat.data.faces import FaceRecords
from facecompat.data.loader import build_dataset
from facecompat.data.splits import list_protocols, split_records
from facecompat.features import FeatureBank
from facecompat.heads import PartialFC
from facecompat.train.trainer import train
from tests.helpers.tools import load_tool
from tests.helpers.train import write_config

DIM = 16
NUM_IDS = 12
# the settings that read the bank's class statistics at start-up (MixBCT: its head's class centres)
PARAMS = {"mixbct": {"head_init": "old_means"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The generated root, the list without one identity (``gap``) and the one-image identities."""
    root = tmp_path_factory.mktemp("protocols")
    tool = load_tool("make_synthetic")
    args = [str(root / "synth"), "--num-ids", str(NUM_IDS), "--imgs-per-id", "1:4", "--ijbc-subjects", "3",
            "--lfw-pairs", "2", "--workers", "1", "--quiet", "--seed", "4"]
    assert tool.main(args) == 0
    full = FaceRecords(root / "synth" / "train", flip=False)
    counts = np.bincount(full.labels, minlength=NUM_IDS)
    singles = np.flatnonzero(counts == 1)
    assert singles.size >= 2 and (counts >= 3).sum() >= 2, counts  # the seed gives both kinds
    # drop a mid-range identity with several images: a gap below the largest label
    gap = int(np.flatnonzero(counts >= 2)[len(np.flatnonzero(counts >= 2)) // 2])
    keep = full.record_ids[full.labels != gap]
    subset = root / "without_one.lst"
    subset.write_text("".join(f"{i}\n" for i in keep.tolist()))
    return {"root": root / "synth", "subset": subset, "gap": gap, "singles": singles, "counts": counts}


def _config(tmp: Path, data: dict, name: str, **sets):
    values = {"data.subset": str(data["subset"]), "data.val_targets": [], "data.batch_size": 4,
              "data.flip": True, "model.embedding_size": DIM, "train.epochs": 1, "train.log_every": 1,
              "train.checkpoint_every": 0, **sets}
    return load_config(write_config(tmp, data["root"], name, **values))


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory, data: dict) -> Path:
    """The old model: EXclass/OPclass's old part (the first 30% identities), a few steps, checkpointed."""
    tmp = tmp_path_factory.mktemp("old")
    cfg = _config(tmp, data, "old", **{"data.protocol": "exclass", "data.part": "old", "train.epochs": 2})
    train(cfg, tmp / "runs" / "old")
    return tmp / "runs" / "old"


def test_opdata_puts_one_image_identities_in_both_parts() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])  # classes 1 and 3 have one image
    ids = np.arange(100, 100 + labels.size) * 7  # arbitrary, unique
    for seed in range(5):
        split = split_records(ids, labels, "opdata", 0.3, seed)
        old, new = set(split.old_records.tolist()), set(split.new_records.tolist())
        single = {int(ids[3]), int(ids[6])}
        assert single <= old & new  # in both parts ...
        assert old & new == single  # ... and nothing else is shared
        assert old | new == set(ids.tolist())
        for part in (old, new):  # every identity on both sides
            assert set(labels[np.isin(ids, list(part))].tolist()) == set(range(5))
        exdata = split_records(ids, labels, "exdata", 0.3, seed)  # new is the full set anyway
        assert np.array_equal(exdata.old_records, split.old_records)


@pytest.mark.parametrize("protocol", list_protocols())
@pytest.mark.parametrize("method", registry.list_methods())
def test_every_method_starts_under_every_protocol(tmp_path: Path, data: dict, old_run: Path, method: str,
                                                   protocol: str) -> None:
    cfg = _config(tmp_path, data, method, **{
        "data.protocol": protocol, "data.part": "new", "compat.method": method,
        "compat.params": PARAMS.get(method, {}), "compat.old": {"checkpoint": str(old_run)},
        "compat.bank_dir": str(old_run.parent.parent / f"bank-{protocol}")})
    view = build_dataset(cfg.data)
    if protocol != "opclass":  # the labels are the dataset's: the gap is a class id without images
        assert view.num_classes == NUM_IDS and data["gap"] not in view.labels
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] >= 1 and math.isfinite(summary["loss"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows if r["kind"] == "train" for k, v in r.items() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    bank = FeatureBank.open(cfg.compat.bank_dir)
    present = np.flatnonzero(data["counts"] > 0)
    if protocol in ("opdata", "exclass", "exdata"):  # every identity with an image has old features
        assert np.array_equal(bank.class_stats().class_ids, present[present != data["gap"]])


def test_a_class_without_images_gets_finite_never_positive_placeholders(tmp_path: Path, data: dict,
                                                                         old_run: Path) -> None:
    """EXdata keeps the dataset's labels: the gap is a view class with no old features."""
    gap, methods = data["gap"], {}
    for method in ("bct", "lce", "advbct", "mixbct"):
        cfg = _config(tmp_path, data, method, **{
            "data.protocol": "exdata", "data.part": "new", "compat.method": method,
            "compat.params": PARAMS.get(method, {}), "compat.old": {"checkpoint": str(old_run)},
            "compat.bank_dir": str(old_run.parent.parent / "bank-exdata")})
        view = build_dataset(cfg.data)
        torch.manual_seed(0)
        head = PartialFC(DIM, view.num_classes)
        before = head.weight.detach().clone()
        methods[method] = (build_compat(cfg, view, head, rank=0, world_size=1, device=torch.device("cpu")),
                           head, before)
    others = np.arange(NUM_IDS) != gap
    bct = methods["bct"][0]
    old_rows = bct.old_head.weight.detach()
    assert not old_rows[gap].any() and not bct.from_old_classifier[gap]  # a zero row: logit 0
    means = torch.from_numpy(others) & ~bct.from_old_classifier  # identities the old model never saw
    assert means.any()
    assert torch.allclose(old_rows[means].norm(dim=1), torch.ones(int(means.sum())), atol=1e-3)
    assert bct.from_old_classifier.any() and torch.isfinite(old_rows).all()
    lce = methods["lce"][0]
    assert lce.num_aligned == NUM_IDS - 1 and not lce.shard_aligned[gap] and lce.shard_aligned[others].all()
    assert np.isfinite(lce.boundary_cos).all()
    adv = methods["advbct"][0]
    assert not adv.has_boundary[gap] and np.isfinite(adv.radius).all()
    mix, head, before = methods["mixbct"]
    weight = head.weight.detach()
    assert torch.equal(weight[gap], before[gap])  # keeps its random centre (not a 0/0 row)
    assert not torch.equal(weight[others], before[others])  # the others start at the old means
    assert torch.allclose(weight[others].norm(dim=1), torch.ones(NUM_IDS - 1), atol=1e-3)
