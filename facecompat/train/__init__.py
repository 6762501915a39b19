"""Training: the loop (trainer), LR schedule, checkpoints, logs, mixed precision."""

from facecompat.train.trainer import Trainer, TrainingError, run_dir_for, train

__all__ = ["Trainer", "TrainingError", "run_dir_for", "train"]
