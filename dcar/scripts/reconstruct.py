"""Reconstruct images with a trained DC-HT through both paths; write a grid, ``psnr.json`` and print the means.

    python scripts/reconstruct.py tokenizer=runs/t/alternate/final data=shapes num=256 out=runs/t/recon
    python scripts/reconstruct.py tokenizer=PATH images=/path/to/folder resolution=256 num=100 out=DIR

``tokenizer`` is a ``save_pretrained`` folder (a run's ``final/``). ``data=shapes`` reads the held-out shapes split,
laid out as the tokenizer's run recorded in ``<tokenizer>/../config.yaml`` (grid, align, exposure, ...);
``images=DIR`` a folder of images (ADM centre crop to ``resolution``). ``resolution=0`` (default) takes the
training run's ``data.resolution`` from ``<tokenizer>/../config.yaml`` when present, else 256. The grid
(``out/recon.png``) shows the first ``grid`` images in three rows: originals, continuous path ``decode(z)``,
discrete path ``decode(zq)``. Metrics (uint8 PSNR / SSIM, codebook usage) are defined in
:mod:`dcar.eval.reconstruction`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dcar.cli import run_cli
from dcar.config import ConfigError, choice, load_config


@dataclass
class ReconstructConfig:
    """Keys of ``scripts/reconstruct.py`` (``key=value`` on the command line)."""

    config: str = ""  # optional YAML with these keys
    tokenizer: str = ""  # save_pretrained folder, e.g. runs/t/alternate/final
    images: str = ""  # a folder of images (flat or class folders)
    data: str = choice("", "", "shapes")  # "shapes": the held-out shapes split
    num: int = 64  # images to evaluate (fewer if the folder has fewer)
    out: str = "runs/reconstruct"
    resolution: int = 0  # 0: the training run's data.resolution (../config.yaml), else 256
    batch_size: int = 32
    grid: int = 16  # images shown in the grid PNG
    seed: int = 0  # shapes data seed (the held-out split of this seed)
    device: str = "auto"  # auto: cuda if available, else cpu


def main(argv: Sequence[str]) -> None:
    cfg = load_config(ReconstructConfig, argv)
    if not cfg.tokenizer:
        raise ConfigError("tokenizer=PATH is required (a save_pretrained folder, e.g. runs/t/alternate/final)")
    if bool(cfg.images) == bool(cfg.data):
        raise ConfigError("give exactly one of images=DIR or data=shapes")
    if cfg.num < 1:
        raise ConfigError("num must be >= 1")

    import torch
    from torch.utils.data import Subset

    from dcar.data.build import run_data_config, shapes_dataset
    from dcar.eval.reconstruction import evaluate_reconstruction
    from dcar.models.tokenizer import DCHT
    from dcar.train.logging import save_image_grid
    from dcar.utils.atomic import atomic_write_text

    tok_path = Path(cfg.tokenizer)
    run_data = run_data_config(tok_path)  # the tokenizer's training run, when its config.yaml sits above final/
    resolution = cfg.resolution or (run_data.resolution if run_data is not None else 256)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    tokenizer = DCHT.from_pretrained(tok_path).to(device).eval()

    if cfg.data == "shapes":
        from dcar.config import DataConfig

        # the layout (grid, align, exposure, ...) the tokenizer was trained on
        data = run_data_config(tok_path, kind="shapes") or DataConfig(kind="shapes")
        dataset = shapes_dataset(dataclasses.replace(data, resolution=resolution), "heldout", size=cfg.num,
                                 seed=cfg.seed)
        ids = list(range(len(dataset)))
        source = f"shapes heldout (seed {cfg.seed})"
    else:
        from dcar.data.imagefolder import ImageFolderDataset

        folder = ImageFolderDataset(cfg.images, resolution)
        dataset = Subset(folder, range(min(cfg.num, len(folder))))
        ids = [folder.samples[i][0] for i in range(len(dataset))]
        source = cfg.images

    result = evaluate_reconstruction(tokenizer, dataset, cfg.batch_size, device, return_images=cfg.grid)
    if len(ids) != result["num_images"]:  # unreadable files were skipped: per-image ids are no longer aligned
        ids = None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = result.pop("images")
    n = shown["original"].shape[0]
    grid_path = save_image_grid(torch.cat([shown["original"], shown["continuous"], shown["discrete"]]),
                                out / "recon.png", nrow=n)
    report = {
        "tokenizer": str(tok_path),
        "source": source,
        "resolution": resolution,
        "num_images": result["num_images"],
        "psnr_continuous": result["continuous"]["psnr"],
        "psnr_discrete": result["discrete"]["psnr"],
        "ssim_continuous": result["continuous"]["ssim"],
        "ssim_discrete": result["discrete"]["ssim"],
        "psnr_gap_db": result["psnr_gap_db"],
        "codebook": result["codebook"],
        "ids": ids,
        "psnr_per_image": {p: result[p]["psnr_per_image"] for p in ("continuous", "discrete")},
    }
    atomic_write_text(out / "psnr.json", json.dumps(report, indent=1))
    cb = result["codebook"]
    print(f"{result['num_images']} images at {resolution} px from {source}")
    print(f"continuous: PSNR {report['psnr_continuous']:.2f} dB  SSIM {report['ssim_continuous']:.4f}")
    print(f"discrete:   PSNR {report['psnr_discrete']:.2f} dB  SSIM {report['ssim_discrete']:.4f}")
    print(f"codebook:   {cb['codes_used']}/{cb['codebook_size']} codes used ({cb['usage']:.1%}), "
          f"perplexity {cb['perplexity']:.1f} over {cb['num_tokens']} tokens")
    print(f"wrote {grid_path} and {out / 'psnr.json'}")


if __name__ == "__main__":
    run_cli(main)
