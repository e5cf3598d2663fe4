"""Sample images with DC-AR: one PNG per image, ``metadata.jsonl`` (file, prompt, seed) and a captioned grid.

    python scripts/sample.py pipeline=runs/shapes/pipeline prompts="a red circle|three blue squares" out=samples
    python scripts/sample.py tokenizer=runs/tok/final generator=runs/gen/final \\
        text_encoder_config=configs/generator/shapes.yaml text_encoder_tokenizer=runs/gen/text_tokenizer \\
        prompts_file=prompts.txt n_per_prompt=4 guidance_scale=3 height=256 width=256
    python scripts/sample.py pipeline=PATH prompts_file=prompts.txt inference.dtype=bfloat16 \
        inference.compile=true inference.compile_mode=reduce-overhead   # GPU: bf16 autocast + CUDA graphs

``inference.*``: precision, torch.compile and the fast paths (:class:`dcar.inference.InferenceConfig`).
``text_encoder_config`` is a YAML file with a ``text_encoder:`` section or a saved text-encoder folder. Batch ``i``
(``batch_size`` images) is sampled with seed ``seed + i``. The grid shows at most the first 64 images.
"""

# no ``from __future__ import annotations``: the nested config sections' types must resolve when the script
# runs through runpy (tests, notebooks)

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcar.cli import run_cli
from dcar.config import ConfigError, load_config
from dcar.config.schema import choice
from dcar.inference import InferenceConfig, configure_pipeline


@dataclass
class SampleConfig:
    """Command-line keys of ``scripts/sample.py``."""

    config: str = ""
    pipeline: str = ""  # a DCARPipeline.save_pretrained folder, or the three below
    tokenizer: str = ""
    generator: str = ""
    text_encoder_config: str = ""
    text_encoder_tokenizer: str = ""  # overrides text_encoder.tokenizer_path (t5-random word tokenizers)
    prompts: str = ""  # "a|b|c"
    prompts_file: str = ""  # one prompt per line
    out: str = "samples"
    seed: int = 0
    num_steps: int = 12
    guidance_scale: float = 4.5
    cfg_schedule: str = choice("linear", "linear", "constant")
    temperature: float = 1.0
    choice_temperature: float = 4.5
    top_k: int = 0  # 0: off
    use_head: bool = True
    head_steps: int = 0  # 0: the head config's num_sampling_steps
    head_guidance_scale: float | None = None  # None: guidance_scale
    head_temperature: float = 1.0
    height: int = 0  # 0: the generator's image_size
    width: int = 0
    n_per_prompt: int = 1
    batch_size: int = 16
    device: str = "auto"
    nrow: int = 0  # grid columns; 0: n_per_prompt (or square)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def read_prompts(cfg: SampleConfig) -> list[str]:
    if bool(cfg.prompts) == bool(cfg.prompts_file):
        raise ConfigError("give exactly one of prompts=\"a|b|c\" and prompts_file=PATH")
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts_file {path} does not exist")
        lines = path.read_text().splitlines()
    else:
        lines = cfg.prompts.split("|")
    prompts = [p.strip() for p in lines if p.strip()]
    if not prompts:
        raise ConfigError("no prompts given")
    return prompts


def build_pipeline(cfg: SampleConfig):
    from dcar.models.generator import DCAR, build_text_encoder
    from dcar.models.tokenizer import DCHT
    from dcar.pipeline import DCARPipeline, load_text_encoder

    if cfg.pipeline:
        if cfg.tokenizer or cfg.generator or cfg.text_encoder_config:
            raise ConfigError("pipeline=PATH replaces tokenizer=, generator= and text_encoder_config=")
        return DCARPipeline.from_pretrained(cfg.pipeline)
    if not (cfg.tokenizer and cfg.generator and cfg.text_encoder_config):
        raise ConfigError("give pipeline=PATH, or tokenizer=PATH generator=PATH text_encoder_config=PATH")
    te_path = Path(cfg.text_encoder_config)
    if te_path.is_dir():
        text_encoder = load_text_encoder(te_path)
    else:
        overrides = {"tokenizer_path": cfg.text_encoder_tokenizer} if cfg.text_encoder_tokenizer else {}
        text_encoder = build_text_encoder(te_path, **overrides)
    tokenizer = DCHT.from_pretrained(cfg.tokenizer).eval()
    generator = DCAR.from_pretrained(cfg.generator).eval()
    return DCARPipeline(tokenizer, generator, text_encoder)


def main(argv: Sequence[str]) -> Path:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from dcar.train.logging import save_image_grid, to_uint8
    from dcar.utils.atomic import atomic_write_text

    cfg = load_config(SampleConfig, argv)
    prompts = read_prompts(cfg)
    if cfg.n_per_prompt < 1 or cfg.batch_size < 1:
        raise ConfigError("n_per_prompt and batch_size must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    pipe = configure_pipeline(build_pipeline(cfg).to(device), cfg.inference)
    jobs = [(i, k, p) for i, p in enumerate(prompts) for k in range(cfg.n_per_prompt)]
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        cfg_schedule=cfg.cfg_schedule, temperature=cfg.temperature, choice_temperature=cfg.choice_temperature,
        top_k=cfg.top_k or None, use_head=cfg.use_head, head_steps=cfg.head_steps or None,
        head_guidance_scale=cfg.head_guidance_scale, head_temperature=cfg.head_temperature,
        height=cfg.height or None, width=cfg.width or None,
    )
    grid_images, grid_captions, rows = [], [], []
    batches = [jobs[s : s + cfg.batch_size] for s in range(0, len(jobs), cfg.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        seed = cfg.seed + b
        images = pipe([p for _, _, p in batch], cfg.num_steps, cfg.guidance_scale, seed=seed, **kwargs)
        for (i, k, p), pixels, image in zip(batch, to_uint8(images).numpy(), images, strict=True):
            name = f"images/{i:05d}_{k:03d}.png"
            Image.fromarray(pixels).save(out / name)
            rows.append({"file": name, "prompt": p, "prompt_index": i, "sample": k, "seed": seed})
            if len(grid_images) < 64:
                grid_images.append(image)
                grid_captions.append(p)
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    nrow = cfg.nrow or (cfg.n_per_prompt if cfg.n_per_prompt > 1 else None)
    grid = save_image_grid(torch.stack(grid_images), out / "grid.png", nrow, grid_captions)
    print(f"wrote {len(rows)} images to {out / 'images'} and the grid {grid}")
    return out


if __name__ == "__main__":
    run_cli(main)
