"""The compatibility step benchmark (facecompat.train.bench_compat): every method runs against ``none``
on a tiny network; its report's shape. No timing is asserted (tools/bench_compat.py: tests/tools)."""

from __future__ import annotations

import math

import pytest

from facecompat.compat.registry import list_methods
from facecompat.train.bench_compat import bench_compat_step
from tests.helpers.models import single_thread

TINY = {"network": "r18-w0.125", "embedding_size": 32, "batch_size": 8, "num_classes": 50}

# One torch thread (a shared CI machine oversubscribes two), restored afterwards.
_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_every_method_against_none(tmp_path):
    result = bench_compat_step(list_methods(), **TINY, steps=2, warmup=1, rounds=1, device="cpu",
                               workdir=tmp_path)
    assert list(result["methods"]) == ["none", *list_methods()]
    assert result["num_records"] == 250 and result["world_size"] == 1 and result["precision"] == "fp32"
    assert result["device_name"] == "cpu" and result["threads"] == 1 and result["peak_memory_gib"] > 0
    assert result["methods"]["none"]["ratio"] == result["methods"]["none"]["ratio_paired"] == 1.0
    assert result["methods"]["none"]["host_ms_per_step"] == 0
    for name, m in result["methods"].items():
        for key in ("ms_per_step", "samples_per_s", "ratio", "ratio_paired"):
            assert math.isfinite(m[key]) and m[key] > 0, (name, key, m)
        assert len(m["round_ms"]) == 1
    assert list(tmp_path.iterdir()) == []  # the temporary bank is removed
