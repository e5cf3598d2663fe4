"""Training infrastructure: the shared loop, checkpoints, EMA, optimizers, run directories and logging."""

from dcar.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dcar.train.ema import EMA
from dcar.train.logging import MetricsLogger, read_metrics, save_image_grid
from dcar.train.run_dir import prepare_run_dir
from dcar.train.trainer import LostProcesses, Trainer, TrainingAborted

__all__ = [
    "EMA", "CheckpointError", "LostProcesses", "MetricsLogger", "Trainer", "TrainingAborted", "latest_checkpoint", "load_checkpoint",
    "prepare_run_dir", "read_metrics", "save_checkpoint", "save_image_grid",
]
