"""Typed configuration schemas shared by every dcar training script.

Schemas are dataclasses (efficientvit's `applications/dc_ae` pattern); YAML files in `configs/` are presets on
top of them and command-line dotlist overrides come last (see :mod:`dcar.config.loader`). A field whose value
must be one of a fixed set declares it with :func:`choice`, so that the loader can list the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


def field_types(cls: type) -> dict[str, Any]:
    """``{field: type}`` of a dataclass with string annotations resolved (the raw annotations where they cannot be)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward references we cannot resolve
        return {f.name: f.type for f in dataclasses.fields(cls)}


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to ``choices`` (validated by the loader, which lists them on error)."""
    if default not in choices:
        raise ValueError(f"default {default!r} is not one of {choices}")
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class RunConfig:
    """Where a run writes: ``run.dir`` holds config, checkpoints, metrics, images and ``final/``."""

    dir: str = "runs/default"
    name: str = ""


@dataclass
class LoopConfig:
    """The step-based training loop shared by all trainers (keys under ``train.``)."""

    steps: int = 1000
    batch_size: int = 16  # per process and micro-batch; global batch = batch_size x grad_accum x processes
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    mixed_precision: str = choice("no", "no", "fp16", "bf16")
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables EMA
    max_bad_steps: int = 20  # consecutive non-finite losses before the run aborts
    # seconds a collective (gradient all-reduce, barrier) may wait for the other processes before this process
    # stops with an error: a dead or stalled rank (e.g. on another node) ends the job instead of hanging it
    dist_timeout_s: float = 1800.0
    num_workers: int = 0
    # CPU: flush subnormal floats to zero inside fit() (torch.set_flush_denormal; the previous mode comes back after).
    # Late in training, optimizer moments and small activations turn subnormal and each such operation costs ~100x;
    # on the 2-core machine it made shapes tokenizer steps 15% and generator steps ~8% faster (README). It sets the
    # CPU's FTZ/DAZ flags only (CUDA kernels are unaffected); float32 values below 1.2e-38 become 0.
    flush_denormal: bool = True
    # torch.compile the trained modules after accelerate prepared them, with static shapes (the generator's
    # diffusion-head loss stays eager; the tokenizer's step trains with dcar.train.runtime.retained_graph_compile):
    # inductor fuses the elementwise work around the GEMMs and convolutions. Checkpoints and exports hold the plain
    # modules' weights either way. "aot_eager" / "eager": dynamo without code generation (debugging).
    compile: bool = False
    compile_mode: str = choice("default", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    compile_backend: str = choice("inductor", "inductor", "aot_eager", "eager")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a constant or cosine schedule (keys under ``optim.``)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = choice("constant", "constant", "cosine")
    min_lr_ratio: float = 0.0
    # torch's fused AdamW kernel (CPU and CUDA; the same update as the default foreach one up to float rounding):
    # 6-13% faster generator steps on 2 CPU cores for the shapes configs (README)
    fused: bool = False


@dataclass
class ShapesConfig:
    """Procedural shapes data (see :mod:`dcar.data.shapes`)."""

    max_objects: int = 4
    size: int = 50_000  # samples per epoch of the train split (samples are generated, not stored)
    heldout_size: int = 512
    background: str = "white"
    grid: int = 0  # 0: objects at any pixel; G >= 16: boxes snapped to a G x G grid of cells (see layout_spec)
    align: int = 0  # 0: off; A: box corners at multiples of A pixels (A = 32: token-aligned for DC-HT; layout_spec)
    shadow: float = 0.0  # soft drop shadows darken the background by up to this fraction (dcar.data.shapes)
    size_scale: float = 1.0  # multiplies the object size ranges (0.7: relation/count objects fit one 32-px token)
    exposure: float = 0.0  # each image is multiplied by its own factor in [1 - exposure, 1] (dcar.data.shapes)
    lighting: bool = False  # the caption names the exposure: bright (1) or dim (1 - exposure), "in dim light"


@dataclass
class DataConfig:
    """Which dataset to read (keys under ``data.``). ``kind`` picks the reader; presets live in ``configs/data/``."""

    kind: str = choice("shapes", "shapes", "imagefolder", "jsonl", "webdataset", "tokens")  # tokens: pretokenize.py
    name: str = ""  # the preset that was selected (``data=<name>``), recorded for the run directory
    path: str = ""  # dataset root / JSONL file / shard pattern or folder / token cache; unused for shapes
    heldout_path: str = ""  # same format as ``path``: previews and evaluation (shapes has its own held-out split)
    image_root: str = ""  # JSONL only: root of relative image paths (default: the JSONL's folder)
    resolution: int = 256
    seed: int = 0  # data seed (shapes scenes, shuffling)
    random_flip: bool = False
    max_caption_chars: int = 2048
    shuffle_buffer: int = 5000  # webdataset only
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class LogConfig:
    """Logging: metrics JSONL always; wandb through accelerate's trackers, ``disabled`` by default."""

    wandb: str = choice("disabled", "disabled", "offline", "online")
    project: str = "dcar"
    progress: bool = True


@dataclass
class TrainConfig:
    """Keys every training script shares.

    ``config`` is the base YAML (default: the paper's setting), ``resume`` is ``auto`` (newest complete checkpoint
    in ``run.dir``), ``never``, or a checkpoint directory. ``init_from`` loads weights only (stage chaining).
    ``train.dist_timeout_s`` bounds every wait on other processes: when a rank dies or stalls, the others stop
    with an error after that many seconds instead of hanging.
    """

    config: str = ""
    seed: int = 0
    resume: str = "auto"
    init_from: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
