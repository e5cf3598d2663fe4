"""``run_benchmark(cfg)``: build a randomly initialised pipeline, measure it, and return / write the JSON report.

Order of work (each timed region is bracketed by device synchronisation):

1. the device's dense matmul rate in the run's dtype (:func:`~dcar.benchmark.timing.matmul_rate`);
2. FLOPs per image: one batch-1 call, piece by piece, each phase under ``FlopCounterMode``; the total is their sum
   (the pieces run exactly the ops of ``pipe(...)``). It also warms the pipeline up (``flops_only=true`` stops
   here);
3. latency: ``latency_warmup`` + ``latency_repeats`` whole calls at ``latency_batch`` (1);
4. phases at ``throughput_batch`` (16): ``phase_repeats`` piece-by-piece calls, median per phase; they also warm
   the batch-16 call up;
5. throughput: ``throughput_warmup`` + ``throughput_repeats`` whole calls at ``throughput_batch``;
6. ``ablate=true``: the transformer phase with each sampling optimisation off (:mod:`dcar.benchmark.phases`), and
   the decode phase with each decoder option on (``DCARPipeline.set_decoder_path``);
7. ``train=true``: generator training throughput (:mod:`dcar.benchmark.train`; changes the weights, so it is last).

Precision: ``precision=autocast`` (default) keeps fp32 weights and runs every call inside
``torch.autocast(device, dtype)`` (matmuls and convolutions in bf16/fp16, as HART samples); ``precision=cast``
casts the tokenizer and generator with ``pipe.to(dtype=...)``. float32 uses neither. ``compile=true`` runs
``pipe.compile(mode=compile_mode, backend=compile_backend, decoder=compile_decoder)`` before the latency runs;
``decoder_channels_last`` / ``decoder_fuse_norms`` set the pipeline's decoder path for every call,
``gelu_epilogue`` the generator's MLP (``DCAR.set_gelu_epilogue``, CUDA only).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dcar.config.loader import ConfigError, to_container
from dcar.inference import DTYPES, compile_pipeline, configure_pipeline
from dcar.models.generator.transformer import TANH_EPILOGUE_DEVICES
from dcar.utils.atomic import atomic_write_json

from .config import BenchmarkConfig, base_prompts, model_configs, output_path, prompt_list
from .phases import PHASES, PhaseClock, PhaseFlops, Sampling, phased_call, transformer_phase
from .timing import (
    device_name,
    keep_freed_memory,
    matmul_rate,
    peak_memory,
    reset_peak_memory,
    stats,
    sync,
    time_calls,
    time_interleaved,
)

__all__ = ["DECODE_TOLERANCE", "DTYPES", "build_pipeline", "count_flops", "resolve_device", "run_benchmark"]

# max abs image difference (images in [-1, 1]) under which a decoder option counts as keeping the images the same
DECODE_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-2}


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda if available, else cpu; a requested cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available")
    return device


def build_pipeline(cfg: BenchmarkConfig, device: torch.device, workdir: str | os.PathLike):
    """A :class:`DCARPipeline` of randomly initialised models on ``device`` (eval mode); ``workdir`` receives
    the word tokenizer of a ``t5-random`` text encoder."""
    from dcar.models.generator import DCAR, TextEncoder, TextEncoderConfig, build_word_tokenizer
    from dcar.models.tokenizer import DCHT
    from dcar.pipeline import DCARPipeline, load_text_encoder

    tok_cfg, gen_cfg = model_configs(cfg)
    if cfg.text_encoder:
        path = Path(cfg.text_encoder)
        if not path.is_dir():
            raise ConfigError(f"text_encoder={cfg.text_encoder!r} is not a local directory (nothing is downloaded)")
        if (path / "dcar_text_encoder.json").is_file():
            text_encoder = load_text_encoder(path)
        else:
            text_encoder = TextEncoder(TextEncoderConfig(kind="t5", name_or_path=str(path),
                                                         max_length=cfg.text_max_length))
    else:
        words = Path(workdir) / "text_tokenizer"
        build_word_tokenizer(base_prompts(cfg), words)
        text_encoder = TextEncoder(TextEncoderConfig(
            kind="t5-random", name_or_path="t5-random-benchmark", tokenizer_path=str(words),
            max_length=cfg.text_max_length, t5_config=dict(cfg.text_t5_config), seed=cfg.seed))
    if text_encoder.hidden_size != gen_cfg.caption_dim:
        raise ConfigError(f"the text encoder gives {text_encoder.hidden_size}-d states but model.caption_dim is "
                          f"{gen_cfg.caption_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tokenizer = DCHT(tok_cfg).eval()
        generator = DCAR(gen_cfg).eval()
    pipe = DCARPipeline(tokenizer, generator, text_encoder).to(device)
    return configure_pipeline(pipe, cfg.inference(), compile=False)  # compiled after the FLOP count


def count_flops(pipe, prompts: list[str], s: Sampling, amp: Callable) -> dict[str, Any]:
    """FLOPs of one ``pipe(prompts, ...)`` call, counted phase by phase (:func:`phased_call` runs the same ops as
    the whole call; tests check that the totals agree): ``{"total": int, "phases": {phase: int}}``."""
    per_phase = PhaseFlops()
    with amp():
        phased_call(pipe, prompts, s, per_phase)
    phases = {p: per_phase.flops.get(p, 0) for p in PHASES}
    return {"total": sum(phases.values()), "phases": phases}


def _timed_phases(pipe, prompts, s, device, amp, repeats: int) -> dict[str, Any]:
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        clock = PhaseClock(device)
        with amp():
            phased_call(pipe, prompts, s, clock)
        runs.append({p: clock.seconds.get(p, 0.0) for p in PHASES})
    per = {p: stats([r[p] for r in runs]) for p in PHASES}
    return {"median": {p: per[p]["median"] for p in PHASES}, "stats": per,
            "total": stats([sum(r.values()) for r in runs])}


def _ablation(pipe, cfg: BenchmarkConfig, s: Sampling, device, amp) -> dict[str, Any]:
    """Transformer phase (text K/V + MaskGIT steps) at ``ablate_batch`` with each optimisation off in turn."""
    batch = cfg.ablate_batch or cfg.throughput_batch
    with torch.no_grad(), amp():
        states, mask = pipe.encode_prompts(prompt_list(cfg, batch))

    def measure(variant: str, forward=None, warmup: int = cfg.ablate_warmup) -> tuple[dict[str, Any], torch.Tensor]:
        codes = []

        def call() -> None:
            with amp():
                codes.append(transformer_phase(pipe, states, mask, s, variant, forward))

        # a compiled generator recompiles for a new batch shape (separate_cfg): never time that compilation
        timing = time_calls(call, device, max(warmup, 1) if cfg.compile else warmup, cfg.ablate_repeats)
        return timing, codes[-1]

    use_cfg = s.flags(pipe)[2]
    base, base_codes = measure("baseline")
    out: dict[str, Any] = {"batch": batch, "baseline_s": base["median"], "baseline": base, "variants": {}}

    def record(name: str, what: str, timing: dict, codes: torch.Tensor, on_s: float, **extra: Any) -> None:
        out["variants"][name] = {"optimisation": what, "off_s": timing["median"], "on_s": on_s,
                                 "speedup": timing["median"] / on_s, "same_codes": bool(torch.equal(codes, base_codes)),
                                 "timing": timing, **extra}

    t, c = measure("full_logits")
    record("logits_at_masked_only", "codebook logits only at still-masked positions", t, c, base["median"])
    if use_cfg:
        t, c = measure("separate_cfg")
        record("batched_cfg", "both CFG branches in one forward of 2B rows", t, c, base["median"])
    else:
        out["variants"]["batched_cfg"] = {"skipped": "guidance_scale == 1 (no CFG)"}
    t, c = measure("recompute_kv")
    record("text_kv_once", "cross-attention K/V computed once per generation", t, c, base["median"])
    if cfg.ablate_compile:
        model = pipe.generator
        if cfg.compile:  # the baseline is compiled in place: the "off" variant calls the eager forward
            t, c = measure("forward", model.forward)
            record("compile", "torch.compile of the generator", t, c, base["median"], backend=cfg.compile_backend,
                   mode=cfg.compile_mode)
        else:
            compiled = torch.compile(model, dynamic=False, backend=cfg.compile_backend, mode=cfg.compile_mode)
            start = time.perf_counter()
            t_on, c_on = measure("forward", compiled, max(1, cfg.ablate_warmup))  # the first warm-up compiles
            t_on["wall_incl_compile_s"] = time.perf_counter() - start
            out["variants"]["compile"] = {
                "optimisation": "torch.compile of the generator", "off_s": base["median"], "on_s": t_on["median"],
                "speedup": base["median"] / t_on["median"], "same_codes": bool(torch.equal(c_on, base_codes)),
                "timing": t_on, "backend": cfg.compile_backend, "mode": cfg.compile_mode}
    else:
        out["variants"]["compile"] = {"skipped": "ablate_compile=false"}
    out["variants"]["gelu_epilogue"] = _epilogue_variant(pipe, cfg, measure, base, base_codes)
    out["variants"].update(_decoder_ablation(pipe, cfg, base_codes, device, amp))
    return out


def _epilogue_variant(pipe, cfg: BenchmarkConfig, measure: Callable, base: dict[str, Any],
                      base_codes: torch.Tensor) -> dict[str, Any]:
    """The transformer phase with ``DCAR.set_gelu_epilogue`` flipped from the run's setting (on a device where
    it applies): off and on timings, and whether the codes stay the same (in bf16 they need not: the fused GELU
    rounds once, the plain path after the GEMM and again after the GELU)."""
    model = pipe.generator
    if pipe.device.type not in TANH_EPILOGUE_DEVICES:
        return {"skipped": f"no GELU epilogue on {pipe.device.type} (only {sorted(TANH_EPILOGUE_DEVICES)})"}
    model.set_gelu_epilogue(not cfg.gelu_epilogue)
    try:
        flipped, flipped_codes = measure("baseline")
    finally:
        model.set_gelu_epilogue(cfg.gelu_epilogue)
    off, on = (flipped, base) if cfg.gelu_epilogue else (base, flipped)
    return {"optimisation": "MLP bias + tanh GELU in the fc1 GEMM's cuBLASLt epilogue", "off_s": off["median"],
            "on_s": on["median"], "speedup": off["median"] / on["median"],
            "same_codes": bool(torch.equal(flipped_codes, base_codes)),
            "codes_agreement": float((flipped_codes == base_codes).float().mean()), "timing": on,
            "off_timing": off}


DECODER_VARIANTS = (
    ("decoder_channels_last", "DC-HT decoder weights and latent in channels_last", {"channels_last": True}),
    ("decoder_fused_norms", "BatchNorm folded into the conv/linear it follows, RMSNorm as F.rms_norm",
     {"fuse_norms": True}),
)


def _decoder_ablation(pipe, cfg: BenchmarkConfig, codes: torch.Tensor, device, amp) -> dict[str, Any]:
    """Decode phase (codebook lookup + residual + DC-HT decoder, ``pipe.decode``) of ``codes`` (B, h, w): the
    plain decoder (off) against each ``set_decoder_path`` option alone (on), timed round-robin
    (:func:`time_interleaved`) so that a shared machine's load drifts over all of them alike; the images are
    compared by their max abs difference (``DECODE_TOLERANCE``). The residual is seeded noise: its values do not
    change the cost. Each variant runs on a shallow copy of the pipeline (same models, its own decoder copy)."""
    b, h, w = codes.shape
    residual = None
    if pipe.generator.head is not None:
        noise = torch.randn((b, pipe.tokenizer.config.latent_channels, h, w),
                            generator=torch.Generator().manual_seed(cfg.seed))
        residual = noise.to(device)
    views = {"off": copy.copy(pipe).set_decoder_path()}
    views.update({name: copy.copy(pipe).set_decoder_path(**options) for name, _, options in DECODER_VARIANTS})
    images: dict[str, torch.Tensor] = {}

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            with amp():
                images[name] = views[name].decode(codes, residual)
        return run

    # the first call of each view builds its decoder copy (and compiles it): at least one untimed round
    timing = time_interleaved({name: call(name) for name in views}, device, max(cfg.ablate_warmup, 1),
                              cfg.ablate_repeats)
    tol, off = DECODE_TOLERANCE[cfg.dtype], timing["off"]
    out: dict[str, Any] = {}
    for name, what, _ in DECODER_VARIANTS:
        on = timing[name]
        diff = float((images[name] - images["off"]).abs().max())
        out[name] = {"optimisation": what, "phase": "decode", "off_s": off["median"], "on_s": on["median"],
                     "speedup": off["median"] / on["median"], "same_images": diff <= tol, "max_abs_diff": diff,
                     "tolerance": tol, "timing": on, "off_timing": off}
    return out


def _environment(cfg: BenchmarkConfig, device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "device_name": device_name(device), "dtype": cfg.dtype,
            "precision": cfg.precision if cfg.dtype != "float32" else "float32",
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32), "malloc_keep": cfg.malloc_keep,
            "compile": cfg.compile, "compile_mode": cfg.compile_mode if cfg.compile else None,
            "decoder_path": {"channels_last": cfg.decoder_channels_last, "fuse_norms": cfg.decoder_fuse_norms},
            "gelu_epilogue": cfg.gelu_epilogue and device.type in TANH_EPILOGUE_DEVICES,
            "load_average_start": list(os.getloadavg()),
            "config": to_container(cfg)}


def run_benchmark(cfg: BenchmarkConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything the module docstring lists; writes the JSON (``out=``) and returns it as a dict. Runs with
    ``threads`` intra-op threads (0: unchanged) and, for float32 on a GPU, TF32 set by ``allow_tf32`` (matmuls and
    cuDNN convolutions); both process-wide settings are restored afterwards."""
    device = resolve_device(cfg.device)
    with _process_settings(cfg, device):
        return _run(cfg, device, log)


@contextlib.contextmanager
def _process_settings(cfg: BenchmarkConfig, device: torch.device) -> Iterator[None]:
    """Torch's intra-op thread count and TF32 flags as ``cfg`` asks during the block, as they were after it."""
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda" and cfg.dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run(cfg: BenchmarkConfig, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    if cfg.malloc_keep and device.type == "cpu" and not keep_freed_memory():
        log("malloc_keep: glibc mallopt is unavailable here; using the default allocator")
    dtype = DTYPES[cfg.dtype]
    s = Sampling(cfg.num_steps, cfg.guidance_scale, cfg.seed)
    result: dict[str, Any] = _environment(cfg, device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcar_bench_") as workdir:
        log("building the pipeline (random weights)")
        pipe = build_pipeline(cfg, device, workdir)
    amp = pipe.autocast  # precision=autocast: every timed piece under the pipeline's autocast
    gen = pipe.generator
    result["models"] = {
        "generator_parameters": gen.num_parameters("transformer"), "head_parameters": gen.num_parameters("head"),
        "tokenizer_parameters": sum(p.numel() for p in pipe.tokenizer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "grid": list(pipe.grid_size()), "image_size": gen.config.image_size,
        "layers": gen.config.num_layers, "width": gen.config.width, "heads": gen.config.num_heads,
        "text_tokens": pipe.text_encoder.config.max_length,
        "text_encoder_dtype": str(next(pipe.text_encoder.parameters()).dtype).replace("torch.", ""),
    }
    log(f"matmul rate ({cfg.dtype})")
    mm = matmul_rate(device, dtype, cfg.matmul_size, cfg.matmul_repeats)
    result["matmul"], result["matmul_flops_per_s"] = mm, mm["flops_per_s"]
    p1, pb = prompt_list(cfg, cfg.latency_batch), prompt_list(cfg, cfg.throughput_batch)
    if cfg.flops or cfg.flops_only:
        log("counting FLOPs (one batch-1 call, per phase)")
        fl = count_flops(pipe, p1[:1], s, amp)
        result["flops_per_image"] = fl["total"]
        result["flops_per_image_phases"] = fl["phases"]
    if cfg.flops_only:
        return _finish(result, cfg, device, started, log)

    def whole(prompts: list[str]) -> Callable[[], Any]:
        def call() -> Any:
            return pipe(prompts, s.num_steps, s.guidance_scale, seed=s.seed)
        return call

    if cfg.compile:
        compile_pipeline(pipe, cfg.inference())
        start = time.perf_counter()
        whole(p1)()
        sync(device)
        result["compile_first_call_s"] = time.perf_counter() - start
    log(f"latency: batch {cfg.latency_batch}, {cfg.latency_warmup} warm-up + {cfg.latency_repeats} timed calls")
    lat = time_calls(whole(p1), device, cfg.latency_warmup, cfg.latency_repeats)
    result["latency"], result["latency_s"] = lat, lat["median"]
    if cfg.latency_phase_repeats:
        log(f"phases: batch {cfg.latency_batch}, {cfg.latency_phase_repeats} piece-by-piece calls")
        ph1 = _timed_phases(pipe, p1, s, device, amp, cfg.latency_phase_repeats)  # where the latency goes
        result["latency_phases"], result["latency_phase_timing"] = ph1["median"], ph1
    b = cfg.throughput_batch
    reset_peak_memory(device)
    log(f"phases: batch {b}, {cfg.phase_repeats} piece-by-piece calls")
    ph = _timed_phases(pipe, pb, s, device, amp, cfg.phase_repeats)
    result["phases"], result["phase_timing"] = ph["median"], ph
    log(f"throughput: batch {b}, {cfg.throughput_warmup} warm-up + {cfg.throughput_repeats} timed calls")
    thr = time_calls(whole(pb), device, cfg.throughput_warmup, cfg.throughput_repeats)
    result["throughput"], result["throughput_img_s"] = thr, b / thr["median"]
    result["peak_memory"] = peak_memory(device)
    if "flops_per_image" in result:
        flops = result["flops_per_image"]
        result["achieved_flops_per_s"] = flops * b / thr["median"]
        result["fraction_of_peak"] = result["achieved_flops_per_s"] / mm["flops_per_s"]
        tf = result["flops_per_image_phases"]["transformer"] * b / ph["median"]["transformer"]
        result["transformer_flops_per_s"] = tf
        result["transformer_fraction_of_peak"] = tf / mm["flops_per_s"]
    if cfg.profile:
        log(f"profile: one batch-{b} call under torch.profiler")
        from .profile import host_syncs, profile_call

        result["profile"] = profile_call(whole(pb), device, output_path(cfg, device.type, cfg.dtype))
        result["host_syncs"] = host_syncs(whole(pb), device)
    if cfg.ablate:
        log("ablation: transformer phase with each optimisation off, decode phase with each decoder option on")
        result["ablation"] = _ablation(pipe, cfg, s, device, amp)
    if cfg.train:
        log(f"training: batch {cfg.train_batch}, 1 counted + {cfg.train_warmup} warm-up + {cfg.train_repeats} steps")
        from .train import train_throughput

        tr = train_throughput(gen, cfg.train_batch, pipe.text_encoder.config.max_length, device, amp,
                              cfg.train_warmup, cfg.train_repeats, cfg.seed,
                              cfg.compile_backend if cfg.train_compile else None)
        tr["compiled"] = cfg.train_compile
        tr["fraction_of_peak"] = tr["achieved_flops_per_s"] / mm["flops_per_s"]
        result["train"] = tr
    return _finish(result, cfg, device, started, log)


def _finish(result: dict[str, Any], cfg: BenchmarkConfig, device: torch.device, started: float,
            log: Callable[[str], None]) -> dict[str, Any]:
    result["wall_s"] = time.perf_counter() - started
    result["load_average_end"] = list(os.getloadavg())
    if device.type == "cpu":
        result.setdefault("peak_memory", peak_memory(device))
    path = output_path(cfg, device.type, cfg.dtype)
    atomic_write_json(path, result, sort_keys=True)
    result["out"] = str(path)
    return result
