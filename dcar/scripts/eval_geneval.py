"""GenEval with DC-AR: images in GenEval's layout, then scoring (official evaluator command, or dcar's rules).

    python scripts/eval_geneval.py pipeline=runs/t2i/pipeline metadata=geneval/prompts/evaluation_metadata.jsonl \\
        out=results/geneval [n_per_prompt=4 seed=42 num_steps=12 guidance_scale=4.5 use_head=true]
    accelerate launch --num_processes 8 scripts/eval_geneval.py pipeline=... metadata=... out=...
    python scripts/eval_geneval.py pipeline=... metadata=... out=... detector=mask2former \\
        detector_config=<mmdet>/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py \\
        detector_checkpoint=<MODEL_DIR>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth

Writes ``<out>/<00000>/metadata.jsonl`` + ``samples/0000.png`` ... (+ ``grid.png``) for every prompt; each
prompt's ``n_per_prompt`` images come from one pipeline call seeded with ``seed`` (GenEval's reference generator
reseeds every prompt). Existing PNGs are reused, so a stopped run resumes. Prompts are sharded over accelerate
processes. Without ``detector=`` nothing here can score the images (GenEval's Mask2Former needs mmdet and its
weights): ``<out>/geneval_results.json`` gets ``"scores": null`` and the command that runs the official evaluator
in its own environment, also printed::

    cd <GENEVAL_REPO> && python evaluation/evaluate_images.py <out> --outfile <out>/results.jsonl \\
        --model-path <MODEL_DIR> && cd evaluation && python summary_scores.py <out>/results.jsonl

With ``detector=mask2former`` (mmdet 2.x, mmcv-full, open_clip installed; CLIP weights cached or given by
``clip_pretrained=FILE``) or ``detector=package.module:factory`` the images are scored with dcar's implementation of
GenEval's rules (:mod:`dcar.eval.geneval`), rows in ``<out>/results_dcar.jsonl``. ``pipeline=`` empty: score the
images already in ``out`` without generating.
"""

# no ``from __future__ import annotations``: the nested config sections' types must resolve when the script
# runs through runpy (tests, notebooks)

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcar.cli import run_cli
from dcar.config import ConfigError, load_config
from dcar.config.schema import choice
from dcar.inference import InferenceConfig, configure_pipeline, inference_settings


@dataclass
class GenEvalConfig:
    """Command-line keys of ``scripts/eval_geneval.py``."""

    config: str = ""
    pipeline: str = ""  # a DCARPipeline.save_pretrained folder; "" = score existing images only
    metadata: str = ""  # GenEval's prompts/evaluation_metadata.jsonl
    out: str = "results/geneval"
    n_per_prompt: int = 4
    seed: int = 42
    num_steps: int = 12
    guidance_scale: float | None = None  # None: the pipeline's default
    cfg_schedule: str = choice("linear", "linear", "constant")
    use_head: bool = True
    grid: bool = True
    detector: str = ""  # "", "mask2former" or "package.module:factory"
    detector_config: str = ""
    detector_checkpoint: str = ""
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1
    device: str = "auto"  # auto (the process's GPU under accelerate, else CPU), cpu or e.g. cuda:0
    progress: bool = True
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # precision, compile, fast paths


def main(argv: Sequence[str]) -> dict[str, Any]:
    from dcar.eval.geneval import GenEvalRules, load_metadata, run_geneval
    from dcar.eval.geneval_detector import backend_available, load_backend
    from dcar.eval.runner import dist_context

    cfg = load_config(GenEvalConfig, argv)
    if not cfg.metadata or not Path(cfg.metadata).is_file():
        raise ConfigError(f"metadata={cfg.metadata!r}: give GenEval's prompts/evaluation_metadata.jsonl")
    if cfg.n_per_prompt < 1:
        raise ConfigError("n_per_prompt must be >= 1")
    try:
        load_metadata(cfg.metadata)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    ctx = dist_context(cfg.device)
    detector = colors = None
    if cfg.detector:
        ok, why = backend_available(cfg.detector)
        if not ok:
            raise ConfigError(f"detector={cfg.detector}: {why}")
        try:
            detector, colors = load_backend(cfg.detector, detector_config=cfg.detector_config,
                                            detector_checkpoint=cfg.detector_checkpoint, clip_model=cfg.clip_model,
                                            clip_pretrained=cfg.clip_pretrained, device=str(ctx.device))
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"detector={cfg.detector}: {err}") from None
    pipe = None
    kwargs: dict[str, Any] = {"num_steps": cfg.num_steps, "cfg_schedule": cfg.cfg_schedule, "use_head": cfg.use_head}
    if cfg.pipeline:
        from dcar.pipeline import DEFAULT_GUIDANCE_SCALE, DCARPipeline

        pipe = configure_pipeline(DCARPipeline.from_pretrained(cfg.pipeline, device=ctx.device), cfg.inference)
        kwargs["guidance_scale"] = DEFAULT_GUIDANCE_SCALE if cfg.guidance_scale is None else cfg.guidance_scale
    rules = GenEvalRules(threshold=cfg.threshold, counting_threshold=cfg.counting_threshold,
                         max_objects=cfg.max_objects, max_overlap=cfg.max_overlap,
                         position_threshold=cfg.position_threshold)
    result = run_geneval(pipe, cfg.metadata, cfg.out, n_per_prompt=cfg.n_per_prompt, seed=cfg.seed,
                         pipe_kwargs=kwargs, detector=detector, color_classifier=colors, rules=rules,
                         backend=cfg.detector, pipeline_path=cfg.pipeline, grid=cfg.grid, ctx=ctx,
                         inference=inference_settings(cfg.inference), progress=cfg.progress)
    if ctx.is_main:
        if result["scores"] is None:
            print(result["message"])
        else:
            s = result["scores"]
            tasks = " ".join(f"{t}={v['accuracy']:.3f}" for t, v in s["tasks"].items())
            print(f"GenEval overall {s['overall']:.4f} ({tasks})")
            print(f"official evaluator: {result['official_command']}")
    return result


if __name__ == "__main__":
    run_cli(main)
