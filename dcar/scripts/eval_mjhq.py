"""MJHQ-30K eval of a DC-AR pipeline (EVAL_PROTOCOLS.md 2.2 / 2.3): one image per prompt, FID overall and per
category, CLIP score; writes ``<out>/results.json``.

    python scripts/eval_mjhq.py pipeline=PATH mjhq.meta=/data/MJHQ-30K/meta_data.json \\
        mjhq.images=/data/MJHQ-30K/mjhq30k_imgs out=results/mjhq [num_steps=12 guidance_scale=4.5 seed=0] \\
        [clip_model=/models/clip-vit-large-patch14] [inference.dtype=bfloat16 inference.compile=true]
    accelerate launch --multi_gpu --num_processes 8 scripts/eval_mjhq.py ...   # prompts split over processes

Samples: ``<out>/samples/<image_id>.png`` (existing ones are never regenerated); features per chunk in
``<out>/parts/``; reference statistics cached in ``ref_stats`` (default
``<out folder>/fid_stats/mjhq30k_<R>px_<N>_<extractor>.npz``). ``inference.*``: precision and compilation
(:mod:`dcar.inference`), recorded with the samples. See :mod:`dcar.eval.mjhq`.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcar.cli import run_cli
from dcar.config import ConfigError, choice, load_config
from dcar.inference import InferenceConfig, configure_pipeline, inference_settings


@dataclass
class MJHQPaths:
    meta: str = ""  # meta_data.json
    images: str = ""  # folder of <category>/<image_id>.jpg
    num_prompts: int = 0  # 0: all (at most 30,000, the protocol)


@dataclass
class MJHQEvalConfig:
    """Keys of ``scripts/eval_mjhq.py`` (``key=value``)."""

    config: str = ""
    pipeline: str = ""  # DCARPipeline.save_pretrained folder
    mjhq: MJHQPaths = field(default_factory=MJHQPaths)
    out: str = "results/mjhq"
    num_steps: int = 12
    guidance_scale: float = 4.5
    seed: int = 0
    batch_size: int = 16  # prompts per generation batch (fixed batches: part of the sample identity)
    resolution: int = 0  # 0: the generator's image_size
    clip_model: str = ""  # local transformers CLIP folder; "": no CLIP score
    jpeg_quality: int = 75  # samples are measured as Sana's quality-75 .jpg files; 0: the PNG pixels
    ref_stats: str = ""
    fid_weights: str = ""  # torch-fidelity feature_extractor_weights_path ("" = torch hub cache)
    feature_extractor: str = "inception-v3-compat"
    feature_layer: str = ""
    fid_resize: str = choice("bilinear-299", "bilinear-299", "extractor")
    feature_batch_size: int = 50
    chunk_size: int = 1000
    num_workers: int = 4
    device: str = "auto"
    progress: bool = True
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # precision, compile, fast paths


def main(argv: Sequence[str]) -> dict:
    cfg = load_config(MJHQEvalConfig, argv)
    for key, value in {"pipeline": cfg.pipeline, "mjhq.meta": cfg.mjhq.meta, "mjhq.images": cfg.mjhq.images}.items():
        if not value:
            raise ConfigError(f"{key}=PATH is required")
    from dcar.eval import fid as F
    from dcar.eval import mjhq as Q
    from dcar.eval import runner as R

    try:
        items = Q.load_meta(cfg.mjhq.meta)
        Q.check_references(cfg.mjhq.images, items)
        gen_cfg = json.loads((Path(cfg.pipeline) / "generator" / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    limit = min(cfg.mjhq.num_prompts or Q.MJHQ_NUM_PROMPTS, Q.MJHQ_NUM_PROMPTS)
    prompts, resolution = items[:limit], cfg.resolution or int(gen_cfg["image_size"])
    ctx = R.dist_context(cfg.device)
    try:  # before any heavy work: the Inception weights (and the CLIP folder) must be there
        with ctx.main_first():
            extractor = F.FeatureExtractor(cfg.feature_extractor, cfg.feature_layer, cfg.fid_weights, ctx.device,
                                           cfg.fid_resize)
        clip = None
        if cfg.clip_model:
            from dcar.eval.metrics import ClipScorer

            clip = ClipScorer(cfg.clip_model, ctx.device)
    except (F.FidWeightsError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    ext = {k: v for k, v in extractor.describe().items() if k != "weights"}
    out = Path(cfg.out)
    load = {"batch_size": cfg.feature_batch_size, "num_workers": cfg.num_workers}

    # reference statistics (all reference images, overall and per category), computed once
    ref_path = Path(cfg.ref_stats or out.parent / "fid_stats" /
                    f"mjhq30k_{resolution}px_{len(items)}_{ext['name']}-{ext['layer']}.npz")
    ref_meta = {"kind": "mjhq-reference", "meta": R.fingerprint(cfg.mjhq.meta), "num_images": len(items),
                "resolution": resolution, "extractor": ext, "preprocess": "pil-bilinear-resize+center-crop"}
    try:
        reference = Q.reference_stats(ctx, items, cfg.mjhq.images, resolution, extractor, ref_path, ref_meta,
                                      out / "parts" / "reference", cfg.chunk_size, cfg.progress, **load)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    # generation (resumable: existing PNGs are kept), then features / CLIP scores per chunk
    sampling = {"num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
                "batch_size": cfg.batch_size, "resolution": resolution}
    inference = R.inference_record(inference_settings(cfg.inference))
    R.prepare_work_dir(ctx, out, {"pipeline": R.fingerprint(cfg.pipeline), **sampling, **inference})
    samples = out / "samples"

    def load_pipeline():
        from dcar.pipeline import DCARPipeline

        return configure_pipeline(DCARPipeline.from_pretrained(cfg.pipeline, device=ctx.device), cfg.inference)

    written = Q.generate_missing(load_pipeline, items, len(prompts), samples, ctx, progress=cfg.progress, **sampling)
    clip_key = f"clip_{R.fingerprint(cfg.clip_model)[:8]}" if clip else "clip"
    keys = ["feat"] + ([clip_key] if clip else [])
    chunks = R.chunk_ranges(len(prompts), cfg.chunk_size)
    work = R.prepare_work_dir(ctx, out / "parts" / "samples", {"num_prompts": len(prompts), "extractor": ext,
                                                               "jpeg_quality": cfg.jpeg_quality,
                                                               "chunk_size": cfg.chunk_size})
    R.run_chunks(ctx, work, chunks, lambda c: Q.image_arrays(
        [Q.sample_path(samples, prompts[i].key) for i in c], resolution, extractor, jpeg_quality=cfg.jpeg_quality,
        clip=clip, prompts=[prompts[i].prompt for i in c], clip_key=clip_key, **load), keys, "mjhq features",
        cfg.progress)
    if not ctx.is_main:
        return {}
    parts = R.load_parts(work, len(chunks), keys)
    summary = Q.summarize(R.concat(parts, "feat"), prompts, reference, R.concat(parts, clip_key) if clip else None)
    env = R.environment()
    result = {
        "protocol": Q.PROTOCOL, "protocol_source": Q.PROTOCOL_SOURCE,
        "pipeline": str(cfg.pipeline), "pipeline_fingerprint": R.fingerprint(cfg.pipeline),
        "resolution": resolution, "sampling": sampling, **inference,
        "num_samples": len(prompts), "num_reference": reference["all"].n,
        "full_protocol": len(prompts) == Q.MJHQ_NUM_PROMPTS and reference["all"].n == Q.MJHQ_NUM_PROMPTS,
        **summary,
        "clip_model": cfg.clip_model or None,
        "samples_dir": str(samples), "jpeg_quality": cfg.jpeg_quality,
        "fid_details": {"feature_extractor": extractor.describe(), "reference_stats": str(ref_path),
                        "preprocess": "RGB, PIL bilinear Resize(R) + CenterCrop(R), same for references and samples"},
        "dcar_version": env["dcar"], "environment": env,
    }
    R.atomic_write_json(out / "results.json", result)
    cs = "n/a" if result["clip_score"] is None else f"{result['clip_score']:.2f}"
    print(f"MJHQ {len(prompts)} samples at {resolution}px ({written} generated): FID {result['fid']:.3f}  "
          f"CLIP {cs}; wrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    run_cli(main)
