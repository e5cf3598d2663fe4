"""ShapesEval: exact text alignment of DC-AR on held-out shapes captions (programmatic detector).

    python scripts/eval_shapes.py pipeline=runs/shapes/pipeline out=results/shapes
    python scripts/eval_shapes.py pipeline=... out=results/shapes_discrete use_head=false   # discrete-only ablation
    python scripts/eval_shapes.py pipeline=... num_captions=128 n_per_caption=4 seed=0
    python scripts/eval_shapes.py pipeline=runs/quickstart/generator/pipeline guidance_scale=1.5 cfg_schedule=constant
    accelerate launch --num_processes 4 scripts/eval_shapes.py pipeline=... out=...
    python scripts/eval_shapes.py validate=true out=results/shapes   # the scorer on the dataset's own renders

Captions: the held-out captions of ``ShapesDataset(seed=data_seed, max_objects=...)`` (all, or a seeded subset of
``num_captions``), or ``captions="a|b|c"``. Writes ``<out>/shapes_eval.json`` (per-attribute accuracy: color, shape,
count, relation; full-caption rate; per family), ``per_image.jsonl`` and ``failures.png``; images in
``<out>/images`` are reused on a rerun. ``validate=true`` needs no pipeline: it checks the scorer on
``validate_images`` ground-truth renders (full-caption rate >= 0.99 for their own captions, <= 0.05 for shuffled ones)
and writes the report to ``<out>/scorer_validation.json``. See :mod:`dcar.eval.shapes_eval`.
"""

# no ``from __future__ import annotations``: the nested config sections' types must resolve when the script
# runs through runpy (tests, notebooks)

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcar.cli import run_cli
from dcar.config import ConfigError, load_config
from dcar.config.schema import choice
from dcar.inference import InferenceConfig, configure_pipeline, inference_settings


@dataclass
class ShapesEvalConfig:
    """Command-line keys of ``scripts/eval_shapes.py``."""

    config: str = ""
    pipeline: str = ""  # a DCARPipeline.save_pretrained folder; "" = score the images already in out
    out: str = "results/shapes"
    captions: str = ""  # "a|b|c"; default: the held-out captions
    num_captions: int = 0  # 0: all held-out captions
    n_per_caption: int = 1
    seed: int = 0
    data_seed: int = 0
    max_objects: int = 4
    batch_size: int = 16
    num_steps: int = 12
    guidance_scale: float | None = None  # None: the pipeline's default
    # "linear" (MAR's ramp, the pipeline's default) or "constant" (the quickstart's): dcar.sampling.CFG_SCHEDULES
    cfg_schedule: str = choice("linear", "constant", "linear")
    # Append "in bright light" / "in dim light" (alternating) to the held-out captions: for generators trained with
    # data.shapes.lighting=true; the lighting attribute is then scored
    lighting: bool = False
    use_head: bool = True
    max_failures: int = 64
    validate: bool = False  # only check the scorer on ground-truth renders (writes <out>/scorer_validation.json)
    validate_images: int = 500
    device: str = "auto"  # auto (the process's GPU under accelerate, else CPU), cpu or e.g. cuda:0
    progress: bool = True
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # precision, compile, fast paths


def main(argv: Sequence[str]) -> dict[str, Any]:
    from dcar.data.shapes import parse_caption
    from dcar.eval.runner import dist_context
    from dcar.eval.shapes_eval import VALIDATION_NAME, evaluate_shapes, heldout_captions, write_scorer_validation

    cfg = load_config(ShapesEvalConfig, argv)
    if cfg.validate:
        report = write_scorer_validation(cfg.out, cfg.validate_images, data_seed=cfg.data_seed)
        print(json.dumps({k: report[k] for k in ("true_full_rate", "shuffled_full_rate", "num_images", "passed")}))
        print(f"wrote {Path(cfg.out) / VALIDATION_NAME}")
        return report
    if cfg.captions:
        captions = [c.strip() for c in cfg.captions.split("|") if c.strip()]
        for c in captions:
            try:
                parse_caption(c)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        source = "captions="
    else:
        captions = heldout_captions(cfg.num_captions, cfg.seed, cfg.data_seed, cfg.max_objects)
        source = (f"ShapesDataset heldout captions (data_seed={cfg.data_seed}, max_objects={cfg.max_objects}, "
                  f"num_captions={cfg.num_captions or 'all'}, subset seed={cfg.seed})")
        if cfg.lighting:
            from dcar.data.shapes import LIGHTING_PHRASES

            phrases = list(LIGHTING_PHRASES.values())
            captions = [f"{c} {phrases[i % len(phrases)]}" for i, c in enumerate(captions)]
            source += ", lighting phrases alternating"
    if not captions:
        raise ConfigError("no captions to evaluate")
    ctx = dist_context(cfg.device)
    pipe = None
    if cfg.pipeline:
        from dcar.pipeline import DCARPipeline

        pipe = configure_pipeline(DCARPipeline.from_pretrained(cfg.pipeline, device=ctx.device), cfg.inference)
    return evaluate_shapes(pipe, captions, cfg.out, n_per_caption=cfg.n_per_caption, seed=cfg.seed,
                           batch_size=cfg.batch_size, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                           use_head=cfg.use_head, pipe_kwargs={"cfg_schedule": cfg.cfg_schedule},
                           max_failures=cfg.max_failures, pipeline_path=cfg.pipeline,
                           source=source, inference=inference_settings(cfg.inference), ctx=ctx,
                           progress=cfg.progress)


if __name__ == "__main__":
    run_cli(main)
