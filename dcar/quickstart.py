"""The main job on a laptop: train and evaluate the dcar pipeline on the built-in shapes data, end to end.

Phases (each resumable: a finished phase is skipped on re-run, an interrupted training phase continues from its
newest checkpoint through ``resume=auto``):

1. ``tokenizer_warmup``, ``tokenizer_discrete``: DC-HT's first two stages on shapes (``configs/tokenizer/shapes.yaml``),
   each initialised from the previous stage's ``final/``; ``tokenizer_merge``: the alternate stage's synonym-code
   merge alone (zero steps), which fixes the encoder + codebook for good;
2. ``pretokenize``: train images encoded once with the merged codes, caption features stored with them
   (``dcar.data.token_cache``);
3. ``generator``: DC-AR (hybrid: discrete tokens + diffusion head) on shapes captions
   (``configs/generator/shapes.yaml``) on top of the frozen tokenizer; writes ``generator/pipeline``; beside it, in a
   second process (``overlap``), ``tokenizer_alternate`` (decoder only: the tokens are the same either way, since
   the alternate stage freezes the encoder and codebook, and ``pipeline`` checks it);
4. ``eval_tokenizer``: PSNR / SSIM of both decoding paths on held-out shapes images, codebook usage, a
   reconstruction grid, and ShapesEval of the reconstructions themselves (the ceiling of any generator decoding
   through this tokenizer); ``pipeline``: the finished tokenizer goes into ``generator/pipeline``;
5. ``samples``: held-out captions (never seen in training) sampled with 12 MaskGIT steps and CFG: a captioned grid;
6. ``shapes_eval_hybrid`` / ``shapes_eval_discrete_only``: ShapesEval on held-out captions with the diffusion head
   on, and with it off (the same generator decoding its tokens alone: the paper's Table 4 at toy scale);
7. ``residual_gain``: ground-truth tokens of held-out images + residuals sampled by the head, decoded, against the
   originals: PSNR of tokens + sampled residuals vs tokens alone vs the continuous path.

Outputs in ``out``: ``metrics.json``, ``report.md``, ``recon_grid.png``, ``samples_grid.png`` and one run directory
per training phase.
``ci=true`` shortens every phase to a few dozen steps (the test variant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcar.cli import configs_dir
from dcar.config.loader import load_config
from dcar.config.schema import choice
from dcar.quickstart_eval import EvalPhases
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
    # Train the tokenizer's alternate stage (decoder only: its encoder and codebook are frozen, so the tokens do not
    # change) in a second process beside the generator, half the CPU threads each until it ends (README:
    # two 1-thread jobs outrun one 2-thread job here). false: one phase after another (the same recipe).
    overlap: bool = True
    # Captions name each image's lighting ("... in dim light": bright x1 / dim x0.88). The tokenizer's first two
    # stages train on its config's continuous exposures; from the merge on, which joins brightness synonyms
    # (merge_codes_gains: the codes keep less of the brightness, the residual tokens more), every phase uses the lit
    # images and captions, so the residual head has something to restore from the caption (README). false: the
    # tokenizer config's data throughout (the brightness is then in no caption).
    lighting: bool = True
    progress: bool = True


# Steps per tokenizer stage for the full run and for the CI variant.
STAGE_STEPS: dict[str, tuple[int, int]] = {"warmup": (500, 12), "discrete": (250, 12), "alternate": (600, 12)}
STAGES = ("warmup", "discrete", "alternate")
GENERATOR_STEPS = (3000, 12)  # relations need ~96k training samples at batch 32 (README)
CACHE_IMAGES = (8192, 64)  # full run, CI variant; 8192 and 12,288 images trained equally well (README)


class Quickstart(EvalPhases):
    """Runs the phases in order, records wall time per phase, and writes the report."""

    def __init__(self, cfg: QuickstartConfig, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.argv = argv or []
        self.state_path = self.out / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {
            "wall_s": {}, "metrics": {}}
        self._clock = time.perf_counter()  # the start of this run's not yet counted wall time
        self.companion: Any = None  # the BackgroundJob running beside the current phases, if any

    # ------------------------------------------------------------------ bookkeeping
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

    def _save_state(self) -> None:
        """Write ``state.json``, with the wall clock of this run so far added to the earlier runs'."""
        now = time.perf_counter()
        self.state["elapsed_s"] = round(self.state.get("elapsed_s", 0.0) + now - self._clock, 1)
        self._clock = now
        atomic_write_json(self.state_path, self.state, sort_keys=True)

    # ------------------------------------------------------------------ phases
    @property
    def tokenizer_config(self) -> str:
        return self.cfg.tokenizer_config or str(configs_dir() / "tokenizer" / "shapes.yaml")

    def tokenizer_dir(self, stage: str) -> Path:
        return self.out / "tokenizer" / stage

    def tokenizer_argv(self, stage: str, progress: bool | None = None) -> list[str]:
        """The tokenizer trainer's overrides for ``stage``; ``merge`` is the alternate stage's synonym-code merge alone
        (zero steps: the frozen encoder + codebook every later phase encodes with), which the alternate stage then
        starts from."""
        cfg = self.cfg
        train_stage = "alternate" if stage == "merge" else stage
        steps = 0 if stage == "merge" else getattr(cfg, f"{stage}_steps") or STAGE_STEPS[stage][1 if cfg.ci else 0]
        argv = [f"config={self.tokenizer_config}", f"stage={train_stage}",
                f"run.dir={self.tokenizer_dir(stage)}", f"train.steps={steps}", f"seed={cfg.seed}",
                f"data.seed={cfg.seed}", f"log.progress={cfg.progress if progress is None else progress}",
                f"train.ckpt_every={max(1, steps // 3)}"]
        previous = {"discrete": "warmup", "merge": "discrete", "alternate": "merge"}
        if stage in previous:
            argv.append(f"init_from={self.tokenizer_dir(previous[stage]) / 'final'}")
        if stage == "alternate":
            argv.append("merge_codes=false")  # merged by the merge phase
        if stage in ("merge", "alternate") and cfg.lighting:
            argv.append("data.shapes.lighting=true")
        if cfg.ci:
            argv += ["train.log_every=4", "codebook_init_images=64", "merge_codes_images=64"]
        return argv

    def train_tokenizer(self, stage: str) -> None:
        from dcar.train.cli import train_tokenizer

        train_tokenizer(self.tokenizer_argv(stage), prog="dcar.quickstart")

    @contextlib.contextmanager
    def alternate_stage_beside(self, block: str) -> Iterator[None]:
        """Run the ``tokenizer_alternate`` phase around the block (the phase ``block``): in a second process beside
        it (``overlap``, unless ``block`` is done), else before it in this process. The block's trainer calls
        ``self.companion.poll`` every step."""
        name = "tokenizer_alternate"
        alone = not self.cfg.overlap or torch.get_num_threads() < 2  # one thread: nothing to share
        if alone or name in self.state["wall_s"] or block in self.state["wall_s"]:
            self.phase(name, lambda: self.train_tokenizer("alternate"))
            yield
            return
        from dcar.utils.background import BackgroundJob

        argv = self.tokenizer_argv("alternate", progress=False)  # its log is a file; the generator's bar shows
        log = self.tokenizer_dir("alternate").with_suffix(".log")
        job = BackgroundJob([sys.executable, "-m", "dcar.train", "tokenizer", *argv], log,
                            threads=torch.get_num_threads() // 2)
        print(f"[quickstart] {name} ... (beside the {block}, {job.threads} thread(s); log: {log})")
        self.companion = job.start()
        try:
            yield
        except BaseException:
            job.terminate()
            raise
        finally:
            self.companion = None
        print(f"[quickstart] waiting for {name}")
        self.state["wall_s"][name] = round(job.wait(), 1)
        self._save_state()

    @functools.cached_property
    def tokenizer_train_config(self) -> Any:
        """The tokenizer config (its ``data`` section and codebook size are shared by every phase)."""
        from dcar.train.tokenizer import TokenizerTrainConfig

        return load_config(TokenizerTrainConfig, [f"config={self.tokenizer_config}"])

    @property
    def data_config(self) -> Any:
        """The tokenizer config's ``data`` section (resolution and shapes layout shared by every phase), lit when
        ``lighting``: the data of every phase from the merge on."""
        data = self.tokenizer_train_config.data
        if self.cfg.lighting:
            data = dataclasses.replace(data, shapes=dataclasses.replace(data.shapes, lighting=True))
        return data

    @property
    def resolution(self) -> int:
        return self.data_config.resolution

    def pretokenize(self) -> dict[str, Any]:
        """Encode train images (and a few held-out ones, for the preview grids) once with the merged codes, and store
        the captions' text features with them."""
        from dcar.data.token_cache import write_token_cache
        from dcar.models.tokenizer import DCHT
        from dcar.train.generator import build_frozen_text_encoder

        tok = DCHT.from_pretrained(self.tokenizer_dir("merge") / "final").eval()  # the alternate stage's codes
        # the generator's own frozen text encoder (same config and seed, same word tokenizer in generator/): its
        # caption features are stored once instead of recomputed at every step (~7% of a step, README)
        text = build_frozen_text_encoder(self.generator_train_config, self.out / "generator", shapes=True).eval()
        n = self.cfg.cache_images or CACHE_IMAGES[1 if self.cfg.ci else 0]
        data = self.shapes("train", n)
        source = {"data": "shapes", "tokenizer": str(self.tokenizer_dir("merge") / "final")}
        write_token_cache(tok, data, self.out / "tokens" / "train", shard_size=4096 if n >= 4096 else 64,
                          batch_size=64, source=source, text_encoder=text, progress=self.cfg.progress)
        write_token_cache(tok, self.heldout(64), self.out / "tokens" / "heldout", shard_size=64, batch_size=64,
                          source=source, progress=False)
        return {"generator": {"cache_images": n}}

    @functools.cached_property
    def generator_train_config(self) -> Any:
        """The generator's config (the text encoder of pretokenize and the trainer's), parsed once."""
        from dcar.train.generator import GeneratorTrainConfig

        return load_config(GeneratorTrainConfig, self.generator_argv())

    def train_generator(self) -> None:
        from dcar.train.generator import GeneratorTrainer

        trainer = GeneratorTrainer(self.generator_train_config, argv=["dcar.quickstart", *self.generator_argv()])
        if self.companion is not None:
            trainer.step_hooks.append(self.companion.poll)  # all threads back once the tokenizer stage ends
        trainer.fit()

    def assemble_pipeline(self) -> None:
        """Put the finished tokenizer (the alternate stage's decoder) into ``generator/pipeline``, after checking
        that its encoder and codebook are the ones the generator's tokens came from."""
        from safetensors.torch import load_file

        from dcar.models.tokenizer import DCHT

        final = self.tokenizer_dir("alternate") / "final"
        frozen = load_file(str(self.tokenizer_dir("merge") / "final" / "model.safetensors"))
        trained = load_file(str(final / "model.safetensors"))
        changed = [k for k, v in frozen.items() if not k.startswith("decoder.") and not torch.equal(v, trained[k])]
        if changed:
            raise RuntimeError(f"{final}: the alternate stage changed {changed[:3]}, which must stay frozen: the "
                               "generator's tokens would not be this tokenizer's")
        DCHT.from_pretrained(final).save_pretrained(self.out / "generator" / "pipeline" / "tokenizer")

    def generator_argv(self) -> list[str]:
        """The generator's config overrides: the shapes config on the quickstart's tokenizer and token cache."""
        cfg, res = self.cfg, self.resolution
        steps = cfg.generator_steps or GENERATOR_STEPS[1 if cfg.ci else 0]
        argv = [f"config={cfg.generator_config or configs_dir() / 'generator' / 'shapes.yaml'}",
                f"tokenizer={self.tokenizer_dir('merge') / 'final'}", f"run.dir={self.out / 'generator'}",
                f"train.steps={steps}", f"train.ckpt_every={max(1, steps // 3)}", f"seed={cfg.seed}",
                f"data.seed={cfg.seed}", f"data.resolution={res}", f"model.image_size={res}",
                f"model.pos_base_size={res // 32}", "data.kind=tokens",
                f"model.codebook_size={self.tokenizer_train_config.model.quantizer.codebook_size}",
                f"data.path={self.out / 'tokens' / 'train'}", f"data.heldout_path={self.out / 'tokens' / 'heldout'}",
                f"log.progress={cfg.progress}"]
        if cfg.ci:
            argv += ["train.log_every=4", "num_preview=2"]
        return argv

    def shapes(self, split: str, n: int):
        """``n`` shapes images of ``split`` at the tokenizer's resolution and layout, for the quickstart's seed."""
        from dcar.data.build import shapes_dataset

        return shapes_dataset(self.data_config, split, size=n, seed=self.cfg.seed)

    def heldout(self, n: int):
        return self.shapes("heldout", n)

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        for stage in STAGES[:2]:
            self.phase(f"tokenizer_{stage}", lambda stage=stage: self.train_tokenizer(stage))
        self.phase("tokenizer_merge", lambda: self.train_tokenizer("merge"))
        self.phase("pretokenize", self.pretokenize)  # alone: it uses both threads well (67 s on 2, 128 s on 1 beside)
        with self.alternate_stage_beside("generator"):
            self.phase("generator", self.train_generator)
        self.phase("eval_tokenizer", self.eval_tokenizer)
        self.phase("pipeline", self.assemble_pipeline)
        self.phase("samples", self.sample_grid)
        self.phase("shapes_eval_hybrid", lambda: self.shapes_eval(use_head=True))
        self.phase("shapes_eval_discrete_only", lambda: self.shapes_eval(use_head=False))
        self.phase("residual_gain", self.residual_gain)
        # total: wall clock over the runs (phases that ran side by side count once), not the sum of the phases
        total = self.state.get("elapsed_s", round(sum(self.state["wall_s"].values()), 1))  # (older state files)
        metrics = {**self.state["metrics"], "wall_s": {**self.state["wall_s"], "total": total}}
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
