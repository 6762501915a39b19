"""The compatibility step benchmark (facecompat.train.bench_compat, tools/bench_compat.py): every method
runs against ``none`` on a tiny network; its report's shape; one-line errors. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _model_util import load_tool

from facecompat.compat.registry import list_methods
from facecompat.train.bench_compat import bench_compat_step

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_compat.py"
TINY = {"network": "r18-w0.125", "embedding_size": 32, "batch_size": 8, "num_classes": 50}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (a shared CI machine oversubscribes two), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_cli_errors_are_one_line(capsys, tmp_path):
    tool = load_tool(TOOL, "bench_compat_tool")
    assert tool.main(["--methods", "none,bct,mixbtc", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: compat.method: unknown method 'mixbtc' (valid: none, advbct, bct, l2, lce, mixbct)"
    assert tool.main(["--num-classes", "10", "--num-records", "5", "--workdir", str(tmp_path)]) == 2
    assert "every class needs a record" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exc:
        tool.main(["--steps", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:  # no GPU here (tests hide CUDA)
        tool.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "--device: cuda: CUDA is not available here" in err


def test_default_methods_are_every_registered_one():
    from facecompat.compat.registry import list_methods

    tool = load_tool(TOOL, "bench_compat_tool")
    assert tool.build_parser().parse_args([]).methods == "all"
    assert tool.selected_methods("all") == ["none", *list_methods()]
    assert set(list_methods()) >= {"bct", "l2", "mixbct", "lce", "advbct"}
    assert tool.selected_methods("bct, l2,") == ["bct", "l2"]
