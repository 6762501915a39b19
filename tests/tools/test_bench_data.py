"""tools/bench_data.py runs end to end on a tiny generated rec (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tools import exit_status, load_tool, run_tool, tool_help


def test_bench_makes_a_rec_and_reports_json(tmp_path):
    rec = tmp_path / "bench"
    args = [rec, "--make", "300", "--n", "200", "--batch-size", "50", "--rounds", "1", "--json"]
    try:
        import nvidia.dali  # noqa: F401

        args.append("--dali")
    except ImportError:
        pass
    out = run_tool("bench_data", *args, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("images_per_s", "reference_images_per_s", "ratio", "decode_only_images_per_s"):
        assert result[key] > 0, key
    assert result["n"] == 200 and result["batch_size"] == 50
    assert 2000 < result["mean_jpeg_bytes"] < 10000  # MS1M-like JPEG sizes
    if "--dali" in args:
        assert result["dali_cpu_images_per_s"] > 0
    assert (rec / "train.rec").is_file() and (rec / "property").read_text().startswith("15,")


def test_bench_table_and_bad_input(tmp_path, capsys):
    tool = load_tool("bench_data")
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "no train.rec" in capsys.readouterr().err
    rec = tmp_path / "small"
    assert tool.main([str(rec), "--make-only", "--make", "40"]) == 0
    assert not capsys.readouterr().out
    assert exit_status(tool.main, [str(rec), "--n", "40", "--batch-size", "50"]) == 2
    assert "need at least one batch" in capsys.readouterr().err
    assert tool.main([str(rec), "--n", "100", "--batch-size", "50"]) == 2  # the rec holds 40
    assert "40 images to measure on, need at least one batch of --batch-size 50" in capsys.readouterr().err
    assert tool.main([str(rec), "--n", "40", "--batch-size", "20", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    assert "ratio facecompat / reference" in table and "img/s" in table


@pytest.fixture(autouse=True)
def _restore_threads():
    """measure() pins OpenCV and torch to one thread and restores them; guard the rest of the session."""
    import cv2
    import torch

    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    yield
    cv2.setNumThreads(cv_threads)
    torch.set_num_threads(torch_threads)


def test_bench_stages_json(tmp_path, capsys):
    tool = load_tool("bench_data")
    rec = tmp_path / "stages"
    assert tool.main([str(rec), "--make", "120", "--n", "100", "--batch-size", "25", "--rounds", "2",
                      "--stages", "--json", "--seed", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 100 and result["images_per_s"] > 0  # the rates are still there
    stages = result["stages_us"]
    assert list(stages) == ["read", "decode", "decode+split", "flip", "normalize", "full"]
    for key, value in stages.items():
        assert isinstance(value, float) and value > 0, key


def test_bench_stages_table_and_library(tmp_path, capsys):
    from facecompat.data.bench import STAGES, make_bench_rec, measure_stages

    rec = make_bench_rec(tmp_path / "lib", 60, seed=1, per_class=7, progress=False)
    assert rec.name == "train.rec" and (rec.parent / "property").read_text().startswith("9,")
    stages = measure_stages(rec.parent, 40, batch_size=20, rounds=1)
    assert tuple(stages) == STAGES and all(v > 0 for v in stages.values())
    tool = load_tool("bench_data")
    assert tool.main([str(rec.parent), "--n", "40", "--batch-size", "20", "--rounds", "1", "--stages"]) == 0
    table = capsys.readouterr().out
    assert "stage: full" in table and "stage: decode + split" in table and "us/img" in table


def test_bench_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from facecompat.data.bench import make_bench_rec

    tool = load_tool("bench_data")
    rec = tmp_path / "rec"
    cases = [(["--n", "10", "--batch-size", "5"], "no train.rec"),  # missing rec, no --make
             (["--make", "0"], "--make: must be >= 1"),
             (["--json", str(tmp_path)], "is a directory")]
    for argv, message in cases:
        assert exit_status(tool.main, [str(rec), *argv]) == 2
        out = capsys.readouterr()
        assert not out.out and out.err.count("\n") == 1, argv
        assert out.err.startswith("bench_data.py: error: ") and message in out.err, argv
    make_bench_rec(rec, 30, progress=False)
    cases = [(["--n", "0"], "--n: must be >= 1"),
             (["--n", "20", "--batch-size", "25"], "need at least one batch"),
             (["--rounds", "0"], "--rounds: must be >= 1"),
             (["--seed", "-1"], "--seed: must be >= 0")]
    for argv, message in cases:
        assert exit_status(tool.main, [str(rec), *argv]) == 2
        out = capsys.readouterr()
        assert not out.out and out.err.count("\n") == 1, argv
        assert out.err.startswith("bench_data.py: error: ") and message in out.err, argv


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_data", capsys)
    for arg in ("rec_dir", "--n", "--batch-size", "--make", "--stages"):
        assert arg in text, arg
