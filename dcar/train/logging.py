"""Run logging: a metrics JSONL always, wandb through accelerate's trackers when asked, PNG image grids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run directory (main process only) and forwards to accelerate trackers.

    ``wandb`` is ``disabled`` (default: nothing is initialised), ``offline`` (a local run folder under
    ``<run.dir>/wandb``, sync later with ``wandb sync``) or ``online``.
    """

    def __init__(self, run_dir: str | Path, accelerator: Any, wandb: str = "disabled", project: str = "dcar",
                 config: dict | None = None, run_name: str = "") -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.tracking = wandb != "disabled"
        if self.tracking:
            os.environ["WANDB_MODE"] = wandb
            accelerator.init_trackers(project, config=config or {},
                                      init_kwargs={"wandb": {"dir": str(run_dir), "name": run_name or None}})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tracking:
            self.accelerator.log(clean, step=step)

    def close(self) -> None:
        if self.tracking:
            self.accelerator.end_training()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) to uint8 (B, H, W, 3)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
                    captions: list[str] | None = None, pad: int = 2) -> Path:
    """Save images in [-1, 1] as one PNG grid, with an optional caption under each tile."""
    pixels = to_uint8(images).numpy()
    n, h, w, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    text_h = 12 * (1 + max((len(c) * 6) // max(w, 1) for c in captions)) if captions else 0
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + text_h + pad)
        grid.paste(Image.fromarray(pixels[i]), (x, y))
        if captions:
            words, line, lines = captions[i].split(), "", []
            for word in words:  # greedy wrap at ~6 px per character
                if line and len(line + " " + word) * 6 > w:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            for j, text in enumerate(lines):
                draw.text((x, y + h + 12 * j), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
