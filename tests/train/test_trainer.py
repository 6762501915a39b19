"""The trainer end to end on generated data: outputs, kill/resume, re-sharding, torchrun
(multi-process, multi-node, restarts after a killed worker). tools/train.py's own behaviour (divergence
and bad inputs as one line, --output, --json): tests/tools/test_train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from facecompat import checkpoint as ckpt
from facecompat import dist
from facecompat.config import load_config
from facecompat.models import get_model
from facecompat.train.trainer import Trainer, train
from tests.helpers import REPO
from tests.helpers.dist import free_port, run_distributed
from tests.helpers.tools import tool_path
from tests.helpers.train import write_config

TRAIN = str(tool_path("train"))


def run(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command (torchrun, or a tool as a user runs it) from the repository root, output captured."""
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def final_state(run_dir: Path) -> tuple[dict, torch.Tensor]:
    """(model.pt, the full head assembled from the last checkpoint's shards)."""
    model = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    last = ckpt.latest_checkpoint(run_dir)
    meta = ckpt.read_meta(last)
    shards = [torch.load(last / f"rank_{r:03d}.pt", weights_only=True) for r in range(meta["world_size"])]
    head = torch.cat([s["head_weight"] for s in sorted(shards, key=lambda s: s["class_start"])])
    return model, head


def assert_same_state(a: Path, b: Path) -> None:
    model_a, head_a = final_state(a)
    model_b, head_b = final_state(b)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    assert torch.equal(head_a, head_b)


# ----------------------------------------------------------------------------- one process


def test_training_writes_every_output_and_learns(tmp_path, synthetic_tiny):
    cfg = load_config(write_config(tmp_path, synthetic_tiny, **{"train.epochs": 4}))
    run_dir = tmp_path / "runs" / "run"
    summary = train(cfg, run_dir)
    # 30 identities x 6-10 images, batch 16: 15 steps/epoch.
    assert summary["step"] == 4 * (summary["step"] // 4) and summary["step"] >= 40
    for name in ("model.pt", "config.yaml", "train.log", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    backbone = get_model("r18-w0.125", 64)
    backbone.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True), strict=True)
    assert load_config(run_dir / "config.yaml") == cfg
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    # Windows of 5 logged losses, not single values: one step's loss swings by +-20% with the batch,
    # and the float path of another CPU moves each value (measured here over 4 seeds: last/first
    # window 0.44-0.53, single values 0.42-0.51); a run that does not learn stays near 1.
    assert len(losses) >= 20 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert [r for r in records if r["kind"] == "val"], "verification never ran"
    assert 0.0 <= summary["verification"]["lfw"] <= 1.0
    kept = ckpt.list_checkpoints(run_dir)
    assert len(kept) == 2 and kept[-1].name == f"step_{summary['step']:08d}"


def test_resume_auto_continues_where_the_run_stopped(tmp_path, synthetic_tiny):
    path = write_config(tmp_path, synthetic_tiny, **{"train.epochs": 1, "data.val_targets": []})
    run_dir = tmp_path / "runs" / "run"
    first = train(load_config(path), run_dir)
    trainer = Trainer(load_config(path, ["train.epochs=2"]), run_dir)
    trainer._resume()
    assert trainer.position.step == first["step"] and trainer.position.epoch == 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        trainer.scheduler.lr_at(first["step"], trainer.cfg.optim.lr))


def test_kill_at_any_moment_then_resume_gives_the_uninterrupted_weights(tmp_path, synthetic_tiny):
    cfg = write_config(tmp_path, synthetic_tiny, **{"data.val_targets": [], "train.checkpoint_every": 2,
                                                    "train.epochs": 2})
    train(load_config(cfg, ["train.exp_name=ref"]), tmp_path / "runs" / "ref")
    run_dir = tmp_path / "runs" / "killed"
    for delay in (0.0, 0.35):  # kill twice: right after a checkpoint, and somewhere later
        proc = subprocess.Popen([sys.executable, TRAIN, str(cfg), "--set", "train.exp_name=killed"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = ckpt.latest_checkpoint(run_dir)
        deadline = time.time() + 120
        while ckpt.latest_checkpoint(run_dir) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    done = run([sys.executable, TRAIN, str(cfg), "--set", "train.exp_name=killed"])
    assert done.returncode == 0, done.stderr
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert_same_state(tmp_path / "runs" / "ref", run_dir)


def test_init_from_loads_the_backbone_only(tmp_path, synthetic_tiny):
    cfg = write_config(tmp_path, synthetic_tiny, **{"train.epochs": 1, "data.val_targets": []})
    run_dir = tmp_path / "runs" / "run"
    train(load_config(cfg), run_dir)
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    tuned = Trainer(load_config(cfg, [f"model.init_from={run_dir / 'model.pt'}", "train.exp_name=ft"]),
                    tmp_path / "runs" / "ft")
    tuned._resume()
    assert tuned.position.step == 0 and not tuned.optimizer.state
    for key, value in tuned.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_checkpoint_discovery_skips_incomplete_ones(tmp_path, synthetic_tiny):
    cfg = write_config(tmp_path, synthetic_tiny, **{"data.val_targets": [], "train.epochs": 1})
    run_dir = tmp_path / "runs" / "run"
    train(load_config(cfg), run_dir)
    good = ckpt.latest_checkpoint(run_dir)
    # A later checkpoint cut short: partial directory, and a complete-looking one with a truncated file.
    (run_dir / "checkpoints" / "step_99999998.partial").mkdir()
    broken = run_dir / "checkpoints" / "step_99999999"
    broken.mkdir()
    (broken / "common.pt").write_bytes(b"x")
    (broken / "meta.json").write_text(json.dumps({"format": 1, "step": 1, "world_size": 1,
                                                  "files": {"common.pt": 1000}}))
    assert ckpt.latest_checkpoint(run_dir) == good
    with pytest.raises(ckpt.CheckpointError, match="meta.json says 1000"):
        ckpt.read_meta(broken)


# ----------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, synthetic_tiny):
    """A 2-process torchrun run, the reference of the multi-node and restart tests."""
    tmp = tmp_path_factory.mktemp("two_rank")
    cfg = write_config(tmp, synthetic_tiny, **{"train.checkpoint_every": 2})
    res = run(torchrun("--standalone", "--nproc-per-node=2", TRAIN, str(cfg),
                            "--set", "train.exp_name=ref"))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, cfg, tmp / "runs" / "ref"


def test_torchrun_two_ranks_trains_and_verifies(two_rank_reference):
    _, _, run_dir = two_rank_reference
    log = (run_dir / "train.log").read_text()
    assert "world size 2" in log and "verification: lfw" in log
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir))
    assert meta["world_size"] == 2 and {"rank_000.pt", "rank_001.pt"} <= set(meta["files"])


def test_two_rank_checkpoint_resumes_resharded_in_one_process(two_rank_reference, tmp_path):
    _, cfg, run_dir = two_rank_reference
    _, head = final_state(run_dir)
    trainer = Trainer(load_config(cfg, [f"train.output={run_dir.parent}", "train.exp_name=ref",
                                        "train.epochs=4"]), run_dir)
    trainer._resume()
    assert torch.equal(trainer.objective.head.weight.detach(), head)
    assert trainer.objective.head.num_local == head.shape[0]
    assert trainer.optimizer.state[trainer.objective.head.weight]["momentum_buffer"].shape == head.shape


@pytest.mark.skipif(not os.environ.get("FACECOMPAT_SLOW"), reason="c10d rendezvous of two agents takes "
                    "~40 s; the two-rank and restart tests cover the collectives; FACECOMPAT_SLOW=1 runs it")
def test_two_nodes_on_loopback_train_one_model(two_rank_reference):
    tmp, cfg, ref_dir = two_rank_reference
    port = free_port()
    agents = [subprocess.Popen(
        torchrun("--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=facecompat-test", TRAIN, str(cfg),
                 "--set", "train.exp_name=multinode"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # torchrun sets one thread per worker only when a node runs several; match the reference.
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for node in range(2)]
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "world size 2" in (tmp / "runs" / "multinode" / "train.log").read_text()
    assert_same_state(ref_dir, tmp / "runs" / "multinode")


class _DDPBefore213(DistributedDataParallel):
    """DistributedDataParallel with torch 2.4-2.12's constructor: no ``forward_sync_buffers``
    (passing it is a TypeError, as on those releases). Records the keywords it was built with."""

    built_with: list[dict] = []

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False,
                 check_reduction=False, gradient_as_bucket_view=False, static_graph=False):
        type(self).built_with.append({"broadcast_buffers": broadcast_buffers,
                                      "gradient_as_bucket_view": gradient_as_bucket_view})
        super().__init__(module, device_ids=device_ids, output_device=output_device, dim=dim,
                         broadcast_buffers=broadcast_buffers, process_group=process_group,
                         bucket_cap_mb=bucket_cap_mb, find_unused_parameters=find_unused_parameters,
                         check_reduction=check_reduction, gradient_as_bucket_view=gradient_as_bucket_view,
                         static_graph=static_graph)


def _train_with_ddp_before_213(rank: int, world: int, cfg_path: str, run_dir: str) -> list[dict]:
    import warnings

    dist.DistributedDataParallel = _DDPBefore213  # what a torch < 2.13 install provides
    cfg = load_config(cfg_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 2.13 calls the old keyword deprecated
        Trainer(cfg, run_dir).train()
    return _DDPBefore213.built_with


def test_two_rank_training_with_the_ddp_of_torch_before_2_13(two_rank_reference):
    """Every multi-rank run builds DDP through dist.data_parallel, which passes only what the
    installed DistributedDataParallel accepts: per-rank buffers by the old keyword, same training."""
    tmp, cfg, ref_dir = two_rank_reference
    run_dir = tmp / "runs" / "ddp_before_213"
    built = run_distributed(_train_with_ddp_before_213, 2, str(cfg), str(run_dir))
    assert built == [[{"broadcast_buffers": False, "gradient_as_bucket_view": True}]] * 2
    assert_same_state(ref_dir, run_dir)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.skipif(not os.environ.get("FACECOMPAT_SLOW"), reason="a torchrun restart after SIGKILL takes "
                    "~35 s; in-process kill/resume determinism is tested above; FACECOMPAT_SLOW=1 runs it")
def test_killed_worker_restarts_from_the_last_checkpoint(two_rank_reference):
    tmp, cfg, ref_dir = two_rank_reference
    run_dir = tmp / "runs" / "fault"
    agent = subprocess.Popen(torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", TRAIN,
                                      str(cfg), "--set", "train.exp_name=fault"),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(run_dir) and agent.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _children(agent.pid)
    assert len(workers) == 2 and agent.poll() is None, "the run ended before a worker could be killed"
    os.kill(workers[1], signal.SIGKILL)
    out = agent.communicate(timeout=240)[0]
    assert agent.returncode == 0, out[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert_same_state(ref_dir, run_dir)
