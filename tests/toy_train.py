"""Test-only training script: the shared :class:`~dcar.train.Trainer` on a tiny regression problem.

    python tests/toy_train.py run.dir=... train.steps=... [any TrainConfig key]

Same loop, checkpoints, process group and error handling as ``scripts/train_*.py``, without importing DC-HT
(diffusers), so a process starts in a few seconds: for fault tests that need many launches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dcar.cli import run_cli
from dcar.config import TrainConfig, load_config
from dcar.train import Trainer


class Vectors(Dataset):
    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.randn(8, generator=torch.Generator().manual_seed(i)), "index": i}


class ToyTrainer(Trainer):
    """Learn x -> reversed x with a small MLP (with dropout: every step draws random numbers)."""

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8))}

    def build_dataset(self) -> Dataset:
        return Vectors()

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        x = batch["x"]
        loss = (self.modules["model"](x) - x.flip(1)).pow(2).mean()
        self.optimize("model", loss)
        return {"loss": float(loss.detach())}


def main(argv: Sequence[str]) -> None:
    ToyTrainer(load_config(TrainConfig, argv), argv=["tests/toy_train.py", *argv]).fit()


if __name__ == "__main__":
    run_cli(main)
