"""Run logging: metrics JSONL, wandb through accelerate's trackers (offline), PNG grids with captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcar.train.logging import MetricsLogger, read_metrics, save_image_grid, to_uint8


class _Acc:
    is_main_process = True


def test_metrics_jsonl_appends_rows(tmp_path):
    log = MetricsLogger(tmp_path, _Acc())
    log.log({"loss": torch.tensor(0.5), "lr": 1e-3}, step=1)
    log.log({"loss": 0.25}, step=2)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": 0.25}]


def test_non_main_process_writes_nothing(tmp_path):
    acc = _Acc()
    acc.is_main_process = False
    MetricsLogger(tmp_path, acc).log({"loss": 1.0}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_through_accelerate(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_SILENT", "true")
    acc = Accelerator(cpu=True, log_with="wandb")
    log = MetricsLogger(tmp_path, acc, wandb="offline", project="dcar-test", config={"a": 1})
    log.log({"loss": 1.5}, step=1)
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.5}]


def test_image_grid_layout_and_pixels(tmp_path):
    images = torch.full((5, 3, 8, 8), -1.0)
    images[1] = 1.0  # white tile
    images[2, 0] = 1.0  # red tile
    path = save_image_grid(images, tmp_path / "g" / "grid.png", nrow=3, pad=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)
    assert (grid[2:10, 2:10] == 0).all()  # tile 0 black
    assert (grid[2:10, 12:20] == 255).all()  # tile 1 white
    assert (grid[2:10, 22:30] == [255, 0, 0]).all()  # tile 2 red
    captioned = np.asarray(Image.open(save_image_grid(images[:2], tmp_path / "c.png", captions=["a red", "b"])))
    assert captioned.shape[0] > 8 + 4 and (captioned[12:, :] < 128).any()  # caption text drawn below the tiles


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
