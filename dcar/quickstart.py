"""The main job on a laptop: train and evaluate the dcar pipeline on the built-in shapes data, end to end.

Phases (each resumable: a finished phase is skipped on re-run, an interrupted training phase continues from its
newest checkpoint through ``resume=auto``):

1. ``tokenizer/warmup``, ``tokenizer/discrete``, ``tokenizer/alternate``: DC-HT's three stages on shapes
   (``configs/tokenizer/shapes.yaml``), each initialised from the previous stage's ``final/``;
2. ``eval_tokenizer``: PSNR / SSIM of both decoding paths on held-out shapes images, codebook usage, a
   reconstruction grid, and ShapesEval of the reconstructions themselves (the ceiling of any generator decoding
   through this tokenizer);
3. ``pretokenize``: train images encoded once by the final tokenizer (``dcar.data.token_cache``);
   ``generator``: DC-AR (hybrid: discrete tokens + diffusion head) on shapes captions
   (``configs/generator/shapes.yaml``) on top of the frozen tokenizer; writes ``generator/pipeline``;
4. ``samples``: held-out captions (never seen in training) sampled with 12 MaskGIT steps and CFG: a captioned grid;
5. ``shapes_eval_hybrid`` / ``shapes_eval_discrete_only``: ShapesEval on held-out captions with the diffusion head
   on, and with it off (the same generator decoding its tokens alone: the paper's Table 4 at toy scale);
6. ``residual_gain``: ground-truth tokens of held-out images + residuals sampled by the head, decoded, against the
   originals: PSNR of tokens + sampled residuals vs tokens alone vs the continuous path.

Outputs in ``out``: ``metrics.json``, ``report.md``, ``recon_grid.png``, ``samples_grid.png`` and one run directory
per training phase.
``ci=true`` shortens every phase to a few dozen steps (the test variant).
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcar.cli import configs_dir
from dcar.config.loader import load_config
from dcar.config.schema import choice
from dcar.utils.atomic import atomic_write_json, atomic_write_text


@dataclass
class QuickstartConfig:
    """``python scripts/quickstart.py [out=DIR] [seed=N] [ci=true] [device=cpu]``."""

    out: str = "runs/quickstart"
    seed: int = 0
    ci: bool = False
    tokenizer_config: str = ""  # default: configs/tokenizer/shapes.yaml
    warmup_steps: int = 0  # 0: the steps in the tokenizer config's comments (STAGE_STEPS)
    discrete_steps: int = 0
    alternate_steps: int = 0
    generator_config: str = ""  # default: configs/generator/shapes.yaml
    generator_steps: int = 0  # 0: GENERATOR_STEPS
    cache_images: int = 0  # train images pre-tokenised for the generator; 0: CACHE_IMAGES
    eval_images: int = 256
    num_captions: int = 128  # captions of the first held-out scenes, for ShapesEval (one image each)
    # CFG on the MaskGIT logits. On this mostly-background canvas CFG turns masked positions into objects: at 2 and
    # above most samples have too many objects, at 1 too few (README); 1.5 gave the best full-caption rate.
    guidance_scale: float = 1.5
    # MAR's linear CFG ramp or a constant scale; constant gave colour 0.81 vs 0.69, relation 0.34 vs 0.33 on the
    # 10-minute generator and 0.72 vs 0.60 / 0.21 vs 0.15 on a quickstart one (128 held-out captions, README).
    cfg_schedule: str = choice("constant", "constant", "linear")  # dcar.sampling.CFG_SCHEDULES
    # The residual head's sampler. Measured on a quickstart run (64 held-out images, ground-truth tokens): head CFG
    # 4.5 lost 0.8-1.2 dB against CFG 1.0 at every temperature, and temperature 0.2 gained 0.6 dB over 1.0.
    head_guidance_scale: float = 1.0
    head_temperature: float = 0.2
    progress: bool = True


# Steps per tokenizer stage for the full run and for the CI variant.
STAGE_STEPS: dict[str, tuple[int, int]] = {"warmup": (400, 12), "discrete": (200, 12), "alternate": (400, 12)}
STAGES = ("warmup", "discrete", "alternate")
GENERATOR_STEPS = (2000, 12)
CACHE_IMAGES = (12288, 64)  # full run, CI variant


class Quickstart:
    """Runs the phases in order, records wall time per phase, and writes the report."""

    def __init__(self, cfg: QuickstartConfig, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.argv = argv or []
        self.state_path = self.out / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {
            "wall_s": {}, "metrics": {}}

    # ------------------------------------------------------------------ bookkeeping
    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state, sort_keys=True)

    def phase(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run ``fn`` unless the phase finished before; store its wall time and metrics."""
        if name in self.state["wall_s"]:
            print(f"[quickstart] {name}: done before, skipped")
            return
        print(f"[quickstart] {name} ...")
        t0 = time.perf_counter()
        metrics = fn()
        self.state["wall_s"][name] = round(time.perf_counter() - t0, 1)
        if metrics:
            _merge(self.state["metrics"], metrics)
        self._save_state()

    # ------------------------------------------------------------------ phases
    @property
    def tokenizer_config(self) -> str:
        return self.cfg.tokenizer_config or str(configs_dir() / "tokenizer" / "shapes.yaml")

    def tokenizer_dir(self, stage: str) -> Path:
        return self.out / "tokenizer" / stage

    def train_tokenizer(self, stage: str) -> None:
        from dcar.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

        cfg = self.cfg
        steps = getattr(cfg, f"{stage}_steps") or STAGE_STEPS[stage][1 if cfg.ci else 0]
        argv = [f"config={self.tokenizer_config}", f"stage={stage}",
                f"run.dir={self.tokenizer_dir(stage)}", f"train.steps={steps}", f"seed={cfg.seed}",
                f"data.seed={cfg.seed}", f"log.progress={cfg.progress}", f"train.ckpt_every={max(1, steps // 3)}"]
        if stage != STAGES[0]:
            argv.append(f"init_from={self.tokenizer_dir(STAGES[STAGES.index(stage) - 1]) / 'final'}")
        if cfg.ci:
            argv += ["train.log_every=4", "codebook_init_images=64", "merge_codes_images=64"]
        TokenizerTrainer(load_config(TokenizerTrainConfig, argv), argv=["dcar.quickstart", *argv]).fit()

    def eval_tokenizer(self) -> dict[str, Any]:
        from dcar.eval.reconstruction import evaluate_reconstruction
        from dcar.eval.shapes_eval import score_reconstructions
        from dcar.models.tokenizer import DCHT
        from dcar.train.logging import save_image_grid
        tok = DCHT.from_pretrained(self.tokenizer_dir("alternate") / "final").eval()
        data = self.heldout(32 if self.cfg.ci else self.cfg.eval_images)
        res = evaluate_reconstruction(tok, data, batch_size=32, return_images=8)
        grid = torch.cat([res["images"][k] for k in ("original", "continuous", "discrete")])
        save_image_grid(grid, self.out / "recon_grid.png", nrow=8)
        ceiling = score_reconstructions(tok, self.heldout(16 if self.cfg.ci else 64))
        return {"tokenizer": {
            "shapes_eval_recon": {path: {"shape": s["shape"], "full": s["full"]} for path, s in ceiling.items()},
            "psnr_continuous": res["continuous"]["psnr"], "psnr_discrete": res["discrete"]["psnr"],
            "ssim_continuous": res["continuous"]["ssim"], "ssim_discrete": res["discrete"]["ssim"],
            "codebook_usage": res["codebook"]["usage"], "codebook_perplexity": res["codebook"]["perplexity"],
            "num_images": res["num_images"],
        }}

    @functools.cached_property
    def tokenizer_train_config(self) -> Any:
        """The tokenizer config (its ``data`` section and codebook size are shared by every phase)."""
        from dcar.train.tokenizer import TokenizerTrainConfig

        return load_config(TokenizerTrainConfig, [f"config={self.tokenizer_config}"])

    @property
    def data_config(self) -> Any:
        """The tokenizer config's ``data`` section: resolution and shapes layout shared by every phase."""
        return self.tokenizer_train_config.data

    @property
    def resolution(self) -> int:
        return self.data_config.resolution

    def pretokenize(self) -> dict[str, Any]:
        """Encode train images (and a few held-out ones, for the preview grids) once with the final tokenizer."""
        from dcar.data.token_cache import write_token_cache
        from dcar.models.tokenizer import DCHT

        tok = DCHT.from_pretrained(self.tokenizer_dir("alternate") / "final").eval()
        n = self.cfg.cache_images or CACHE_IMAGES[1 if self.cfg.ci else 0]
        data = self.shapes("train", n)
        source = {"data": "shapes", "tokenizer": str(self.tokenizer_dir("alternate") / "final")}
        write_token_cache(tok, data, self.out / "tokens" / "train", shard_size=4096 if n >= 4096 else 64,
                          batch_size=64, source=source, progress=self.cfg.progress)
        write_token_cache(tok, self.heldout(64), self.out / "tokens" / "heldout", shard_size=64, batch_size=64,
                          source=source, progress=False)
        return {"generator": {"cache_images": n}}

    def train_generator(self) -> None:
        from dcar.train.generator import GeneratorTrainConfig, GeneratorTrainer

        cfg, res = self.cfg, self.resolution
        steps = cfg.generator_steps or GENERATOR_STEPS[1 if cfg.ci else 0]
        argv = [f"config={cfg.generator_config or configs_dir() / 'generator' / 'shapes.yaml'}",
                f"tokenizer={self.tokenizer_dir('alternate') / 'final'}", f"run.dir={self.out / 'generator'}",
                f"train.steps={steps}", f"train.ckpt_every={max(1, steps // 3)}", f"seed={cfg.seed}",
                f"data.seed={cfg.seed}", f"data.resolution={res}", f"model.image_size={res}",
                f"model.pos_base_size={res // 32}", "data.kind=tokens",
                f"model.codebook_size={self.tokenizer_train_config.model.quantizer.codebook_size}",
                f"data.path={self.out / 'tokens' / 'train'}", f"data.heldout_path={self.out / 'tokens' / 'heldout'}",
                f"log.progress={cfg.progress}"]
        if cfg.ci:
            argv += ["train.log_every=4", "num_preview=2"]
        GeneratorTrainer(load_config(GeneratorTrainConfig, argv), argv=["dcar.quickstart", *argv]).fit()

    @property
    def head_kwargs(self) -> dict[str, float]:
        return {"head_guidance_scale": self.cfg.head_guidance_scale, "head_temperature": self.cfg.head_temperature}

    def sampler_kwargs(self, use_head: bool = True) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for samples and ShapesEval (the head's only with the head)."""
        return {"cfg_schedule": self.cfg.cfg_schedule, **(self.head_kwargs if use_head else {})}

    def pipeline(self):
        from dcar.pipeline import DCARPipeline

        return DCARPipeline.from_pretrained(self.out / "generator" / "pipeline")

    def shapes(self, split: str, n: int):
        """``n`` shapes images of ``split`` at the tokenizer's resolution and layout, for the quickstart's seed."""
        from dcar.data.build import shapes_dataset

        return shapes_dataset(self.data_config, split, size=n, seed=self.cfg.seed)

    def heldout(self, n: int):
        return self.shapes("heldout", n)

    def sample_grid(self) -> None:
        from dcar.train.logging import save_image_grid

        data = self.heldout(16)
        captions = [data[i]["caption"] for i in range(len(data))]
        images = self.pipeline()(captions, guidance_scale=self.cfg.guidance_scale, seed=self.cfg.seed,
                                 **self.sampler_kwargs())
        save_image_grid(images, self.out / "samples_grid.png", nrow=8, captions=captions)

    @torch.no_grad()
    def shapes_eval(self, use_head: bool) -> dict[str, Any]:
        from dcar.eval.shapes_eval import evaluate_shapes

        name = "hybrid" if use_head else "discrete_only"
        n = 8 if self.cfg.ci else self.cfg.num_captions
        data = self.heldout(n)  # the captions of the first n held-out scenes: the split's family mix
        captions = [data.scene(i).caption for i in range(n)]
        res = evaluate_shapes(self.pipeline(), captions, self.out / "shapes_eval" / name, seed=self.cfg.seed,
                              guidance_scale=self.cfg.guidance_scale, use_head=use_head,
                              pipe_kwargs=self.sampler_kwargs(use_head),
                              progress=self.cfg.progress)
        keys = ("color", "shape", "count", "relation", "full", "lighting")
        return {"shapes_eval": {name: {k: res["scores"][k] for k in keys}}}

    @torch.no_grad()
    def residual_gain(self) -> dict[str, Any]:
        """PSNR of decode(tokens + head-sampled residuals) vs decode(tokens) vs decode(z), on held-out images."""
        from dcar.eval.reconstruction import psnr_per_image

        pipe = self.pipeline()
        data = self.heldout(32 if self.cfg.ci else 128)
        psnr: dict[str, list[float]] = {"tokens": [], "tokens_plus_sampled_residual": [], "continuous": []}
        for start in range(0, len(data), 32):
            items = [data[i] for i in range(start, min(start + 32, len(data)))]
            images = torch.stack([it["image"] for it in items]).to(pipe.device)
            enc = pipe.tokenizer.eval().encode(images)
            residual = pipe.refine_residuals(enc.indices, [it["caption"] for it in items], seed=self.cfg.seed + start,
                                             **self.head_kwargs)
            recon = {"tokens": pipe.decode(enc.indices), "continuous": pipe.tokenizer.decode(enc.z).clamp(-1, 1),
                     "tokens_plus_sampled_residual": pipe.decode(enc.indices, residual)}
            for k, v in recon.items():
                psnr[k].extend(psnr_per_image(images, v).tolist())
        mean = {k: sum(v) / len(v) for k, v in psnr.items()}
        return {"residual": {f"psnr_{k}": v for k, v in mean.items()},
                "residual_gain_db": mean["tokens_plus_sampled_residual"] - mean["tokens"]}

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        for stage in STAGES:
            self.phase(f"tokenizer_{stage}", lambda stage=stage: self.train_tokenizer(stage))
        self.phase("eval_tokenizer", self.eval_tokenizer)
        self.phase("pretokenize", self.pretokenize)
        self.phase("generator", self.train_generator)
        self.phase("samples", self.sample_grid)
        self.phase("shapes_eval_hybrid", lambda: self.shapes_eval(use_head=True))
        self.phase("shapes_eval_discrete_only", lambda: self.shapes_eval(use_head=False))
        self.phase("residual_gain", self.residual_gain)
        metrics = {**self.state["metrics"], "wall_s": {**self.state["wall_s"],
                                                       "total": round(sum(self.state["wall_s"].values()), 1)}}
        atomic_write_json(self.out / "metrics.json", metrics, sort_keys=True)
        atomic_write_text(self.out / "report.md", self.report(metrics))
        return metrics

    def report(self, metrics: dict[str, Any]) -> str:
        rows = [(k, v) for k, v in _flatten(metrics) if not k.startswith("wall_s")]
        lines = [
            "# dcar quickstart report", "",
            f"Command: `{shlex.join([Path(sys.executable).name, 'scripts/quickstart.py', *self.argv])}`", "",
            "| metric | value |", "|---|---|",
            *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows),
            "", "| phase | wall time (s) |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in metrics["wall_s"].items()), "",
            "Images: `recon_grid.png` (rows: held-out originals, continuous path, discrete path), "
            "`samples_grid.png` (held-out captions, never seen in training).", "",
            "Config:", "", "```yaml", _yaml(self.cfg), "```", "",
        ]
        return "\n".join(lines)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Deep-merge ``new`` into ``into`` (nested metric groups from several phases)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def _yaml(cfg: Any) -> str:
    from dcar.config.loader import to_yaml

    return to_yaml(cfg).rstrip()
