"""``scripts/benchmark.py`` configuration: the typed schema, its presets and the model configs it resolves to.

``BenchmarkConfig`` is loaded through :func:`dcar.config.load_config`: schema defaults (the paper setting, for a
GPU) <- ``preset=NAME`` (``configs/benchmark/NAME.yaml``: ``paper``, ``cpu-mid``, ``tiny``) <- ``key=value``
overrides. An unknown key stops the script with the key named and the closest valid keys, before anything is
built. The two models come from YAML files (``tokenizer=``, ``generator=``: a path or a name under
``configs/tokenizer/`` / ``configs/generator/``); ``tokenizer_model.*`` and ``model.*`` override single fields of
their ``model:`` sections and are checked against :class:`DCHTConfig` / :class:`DCARConfig` the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dcar.cli import configs_dir
from dcar.config.loader import ConfigError, Preset, check_keys, load_config, schema_paths
from dcar.config.schema import choice
from dcar.inference import COMPILE_MODES, DTYPES, InferenceConfig

__all__ = ["DEFAULT_PROMPTS", "BenchmarkConfig", "base_prompts", "benchmark_preset", "load_benchmark_config",
           "model_configs", "output_path", "prompt_list"]

# Built-in prompts (short captions of everyday scenes and the shapes vocabulary); batches cycle through them.
DEFAULT_PROMPTS = (
    "a red circle above a blue square",
    "three green triangles on a white background",
    "a photo of a cat sitting on a wooden chair",
    "a yellow diamond left of a purple circle",
    "a bowl of ramen with an egg and green onions",
    "two orange squares below a cyan triangle",
    "a lighthouse on a rocky coast at sunset",
    "a watercolor painting of a fox in the snow",
    "a red sports car parked in front of a glass building",
    "an astronaut riding a horse on the moon",
    "a cup of coffee next to an open book",
    "four blue circles in a row",
    "a mountain lake with pine trees and a small cabin",
    "a close-up of a hummingbird drinking from a flower",
    "a city street at night with neon signs and rain",
    "a green square right of a magenta diamond",
)


@dataclass
class BenchmarkConfig:
    """Command-line keys of ``scripts/benchmark.py`` (see the README's "Performance" section)."""

    config: str = ""
    preset: str = ""  # set by preset=NAME
    # ---- models (random weights) -------------------------------------------------------------------------------
    tokenizer: str = "dcht_f32c32"  # YAML path or a name under configs/tokenizer/
    generator: str = "dcar_512"  # YAML path or a name under configs/generator/
    tokenizer_model: dict[str, Any] = field(default_factory=dict)  # overrides of the tokenizer's model: section
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the generator's model: section
    text_encoder: str = ""  # "": random T5-base-sized encoder + word tokenizer of the prompts; else a local T5 dir
    text_t5_config: dict[str, Any] = field(default_factory=dict)  # t5-random dims over T5-base's
    text_max_length: int = 120
    prompts: str = ""  # "a|b|c" (default: the built-in list)
    # ---- device and precision ----------------------------------------------------------------------------------
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = choice("bfloat16", *DTYPES)
    # autocast: fp32 weights, matmuls in dtype (torch.autocast; HART's fp16 sampling); cast: pipe.to(dtype=dtype)
    # casts tokenizer + generator (the text encoder stays float32)
    precision: str = choice("autocast", "autocast", "cast")
    # with precision=cast and dtype=bfloat16 the text encoder is cast too (T5 runs in bf16 as trained; float16
    # keeps it float32: T5's activations overflow fp16)
    cast_text_encoder: bool = True
    threads: int = 0  # torch.set_num_threads (0: torch's default)
    # dtype=float32 on a GPU: TF32 tensor cores for matmuls and cuDNN convolutions (false: true fp32 for both;
    # torch's own default turns TF32 on for convolutions only, which made fp32 decodes differ by ~1e-3)
    allow_tf32: bool = False
    malloc_keep: bool = False  # CPU/glibc: never return freed memory to the OS (no page faults on reused buffers)
    compile: bool = False  # torch.compile the generator's forward (DCARPipeline.compile, dynamic=False)
    compile_backend: str = "inductor"
    # torch.compile mode; reduce-overhead = CUDA graphs on a GPU (static shapes: fixed batch and grid)
    compile_mode: str = choice("default", *COMPILE_MODES)
    compile_decoder: bool = False  # with compile=true: also compile the DC-HT decoder
    compile_head: bool = True  # with compile=true: also compile the diffusion head's denoising network
    compile_text: bool = False  # with compile=true: also compile the text encoder's transformer
    # with a CUDA-graph compile_mode: each call's cross-attention K/V go into fixed buffers (DCARPipeline.text_kv)
    static_text_kv: bool = True
    # sampling on CUDA: the MLP's bias + tanh GELU in the fc1 GEMM's cuBLASLt epilogue (DCAR.set_gelu_epilogue;
    # no effect on a CPU, whose fused kernel computes the exact GELU instead)
    gelu_epilogue: bool = False
    decoder_channels_last: bool = False  # DCARPipeline.set_decoder_path(channels_last=...)
    decoder_fuse_norms: bool = False  # DCARPipeline.set_decoder_path(fuse_norms=...)
    seed: int = 0
    # ---- sampling (the quality evaluations' settings) ---------------------------------------------------------
    num_steps: int = 12
    guidance_scale: float = 4.5
    # ---- what to measure ---------------------------------------------------------------------------------------
    latency_batch: int = 1
    latency_warmup: int = 10
    latency_repeats: int = 50
    throughput_batch: int = 16
    throughput_warmup: int = 10
    throughput_repeats: int = 50
    phase_repeats: int = 20  # phase breakdown at throughput_batch (runs after the latency runs)
    latency_phase_repeats: int = 20  # phase breakdown at latency_batch, where the latency goes (0: skipped)
    matmul_size: int = 0  # square GEMM for the device's matmul rate (0: 8192 on GPU, 2048 on CPU)
    matmul_repeats: int = 20
    flops: bool = True  # count FLOPs with FlopCounterMode (one batch-1 call, whole and per phase)
    flops_only: bool = False  # count FLOPs and stop (no timing): e.g. the paper model on a CPU
    train: bool = True  # generator training throughput (GeneratorStep forward + backward + AdamW)
    train_batch: int = 16
    train_warmup: int = 3
    train_repeats: int = 10
    # the training step compiled as train.compile=true does (torch.compile of GeneratorStep, compile_backend, mode
    # "default"; the diffusion head's loss stays eager)
    train_compile: bool = False
    # one whole batch-``throughput_batch`` call under torch.profiler: the ops by self device time go to
    # ``<out>.profile.txt`` and the top ones into the JSON (``profile``)
    profile: bool = False
    ablate: bool = False  # transformer phase with each sampling optimisation off, decode phase with each decoder option
    ablate_batch: int = 0  # 0: throughput_batch
    ablate_warmup: int = 2
    ablate_repeats: int = 5
    ablate_compile: bool = True  # include torch.compile on/off in the ablation
    out: str = ""  # JSON path (default runs/benchmark/[<preset>_]<device>_<dtype>.json)


    def inference(self) -> InferenceConfig:
        """The precision / compile / fast-path keys as the :class:`InferenceConfig` the pipeline is set up with
        (the same keys, at the top level here)."""
        return InferenceConfig(**{f.name: getattr(self, f.name) for f in fields(InferenceConfig)})


def benchmark_preset() -> Preset:
    """``preset=NAME`` merges ``configs/benchmark/NAME.yaml`` and records the name in ``preset``."""
    return Preset("preset", configs_dir() / "benchmark", record="preset")


def _check(cfg: BenchmarkConfig) -> None:
    positive = ("num_steps", "latency_batch", "throughput_batch", "train_batch", "text_max_length")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    counts = ("latency_warmup", "throughput_warmup", "train_warmup", "ablate_warmup", "threads", "matmul_size",
              "ablate_batch", "latency_phase_repeats")
    for name in counts:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"'{name}' must be >= 0, got {getattr(cfg, name)}")
    repeats = ("latency_repeats", "throughput_repeats", "phase_repeats", "matmul_repeats", "train_repeats",
               "ablate_repeats")
    for name in repeats:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"'{name}' must be >= 1 (timed repeats), got {getattr(cfg, name)}")


def load_benchmark_config(argv: Sequence[str] = ()) -> BenchmarkConfig:
    """The resolved config; the model overrides are checked here too (:func:`model_configs` builds them)."""
    cfg = load_config(BenchmarkConfig, argv, presets=[benchmark_preset()])
    _check(cfg)
    model_configs(cfg)  # unknown model.* / tokenizer_model.* keys fail now, before anything heavy is built
    return cfg


def _yaml_path(value: str, kind: str) -> Path:
    path = Path(value)
    if path.is_file():
        return path
    named = configs_dir() / kind / f"{value}.yaml"
    if named.is_file():
        return named
    choices = ", ".join(sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml")))
    raise ConfigError(f"'{kind}': {value!r} is neither a YAML file nor one of configs/{kind}/: {choices}")


def _section(path: Path, overrides: dict[str, Any], cls: type, key: str) -> Any:
    """``cls`` from the ``model:`` section of ``path`` with ``overrides`` (reported as ``<key>.<field>``) merged."""
    from omegaconf import OmegaConf

    from dcar.config.sections import load_section

    paths: dict[str, Any] = {f"{key}.{p}": f for p, f in schema_paths(cls).items()}
    paths[key] = None
    check_keys(overrides, paths, "on the command line or in the preset", prefix=f"{key}.")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    section = data.get("model", data)
    try:
        return load_section(OmegaConf.to_container(OmegaConf.merge(section, overrides)), cls, "model",
                            prefix=f"{key}.")
    except ConfigError:
        raise
    except Exception as err:  # wrong types / values rejected by the dataclass or its validate()
        raise ConfigError(f"invalid {key} config ({path} with overrides {overrides}): {err}") from None


def model_configs(cfg: BenchmarkConfig):
    """``(DCHTConfig, DCARConfig)`` from the YAML files and the ``tokenizer_model.*`` / ``model.*`` overrides."""
    from dcar.models.generator import DCARConfig
    from dcar.models.tokenizer import DCHTConfig

    tok = _section(_yaml_path(cfg.tokenizer, "tokenizer"), dict(cfg.tokenizer_model), DCHTConfig, "tokenizer_model")
    gen = _section(_yaml_path(cfg.generator, "generator"), dict(cfg.model), DCARConfig, "model")
    if tok.quantizer.codebook_size != gen.codebook_size:
        raise ConfigError(f"tokenizer codebook {tok.quantizer.codebook_size} != generator codebook_size "
                          f"{gen.codebook_size} (set model.codebook_size)")
    if cfg.text_max_length > gen.max_text_len:
        raise ConfigError(f"text_max_length={cfg.text_max_length} exceeds the generator's max_text_len "
                          f"{gen.max_text_len}")
    return tok, gen


def base_prompts(cfg: BenchmarkConfig) -> list[str]:
    """The prompts of ``prompts="a|b|c"``, or the built-in list."""
    base = [p.strip() for p in cfg.prompts.split("|") if p.strip()] if cfg.prompts else list(DEFAULT_PROMPTS)
    if not base:
        raise ConfigError("prompts= holds no prompt")
    return base


def prompt_list(cfg: BenchmarkConfig, n: int) -> list[str]:
    """``n`` prompts cycling through :func:`base_prompts`."""
    base = base_prompts(cfg)
    return [base[i % len(base)] for i in range(n)]


def output_path(cfg: BenchmarkConfig, device: str, dtype: str) -> Path:
    """``out=`` or ``runs/benchmark/[<preset>_]<device>_<dtype>.json``."""
    if cfg.out:
        return Path(cfg.out)
    stem = f"{cfg.preset}_{device}_{dtype}" if cfg.preset else f"{device}_{dtype}"
    return Path("runs") / "benchmark" / f"{stem}.json"
