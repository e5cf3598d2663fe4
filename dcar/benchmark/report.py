"""The terminal table of a benchmark result (the dict that :func:`dcar.benchmark.run_benchmark` returns)."""

from __future__ import annotations

from typing import Any

from .phases import PHASES

__all__ = ["format_report"]


def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _rate(x: float) -> str:
    return _flops(x) + "/s"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _phases(seconds: dict[str, float]) -> str:
    return ", ".join(f"{p} {seconds[p]:.3g} s" for p in PHASES) + f"; sum {sum(seconds.values()):.4g} s"


def format_report(r: dict[str, Any]) -> str:
    """A two-column table: what was measured and its value."""
    m = r["models"]
    rows: list[tuple[str, str]] = []
    add = lambda k, v: rows.append((k, v))
    add("device", f"{r['device']}: {r['device_name']}, {r['threads']} threads")
    add("precision", f"{r['dtype']} ({r['precision']}), torch {r['torch_version']}")
    add("generator", f"{m['layers']} x {m['width']}, {m['heads']} heads, {m['generator_parameters'] / 1e6:.1f}M "
                     f"+ head {m['head_parameters'] / 1e6:.1f}M; {m['grid'][0]}x{m['grid'][1]} tokens "
                     f"({m['image_size']} px), {m['text_tokens']} text tokens")
    mm = r["matmul"]
    add("matmul rate", f"{_rate(mm['flops_per_s'])} ({mm['size']}^3 {mm['dtype']} GEMM, median of "
                       f"{mm['seconds']['n']})")
    if "flops_per_image" in r:
        ph = r["flops_per_image_phases"]
        add("FLOPs per image", f"{_flops(r['flops_per_image'])} (" +
            ", ".join(f"{p} {_flops(ph[p])}" for p in PHASES) + ")")
    if "latency" in r:
        lat = r["latency"]
        add(f"latency (batch {r['config']['latency_batch']})",
            f"{lat['median']:.4g} s (median of {lat['n']}; mean {lat['mean']:.4g}, min {lat['min']:.4g})")
        if "latency_phases" in r:
            add(f"phases at batch {r['config']['latency_batch']}", _phases(r["latency_phases"]))
        thr = r["throughput"]
        b = r["config"]["throughput_batch"]
        add(f"throughput (batch {b})", f"{r['throughput_img_s']:.4g} img/s ({thr['median']:.4g} s per batch, "
                                      f"median of {thr['n']})")
        add(f"phases at batch {b}", _phases(r["phases"]))
    if "fraction_of_peak" in r:
        add("achieved (whole call)", f"{_rate(r['achieved_flops_per_s'])} = {r['fraction_of_peak']:.1%} of matmul")
        add("transformer phase", f"{_rate(r['transformer_flops_per_s'])} = {r['transformer_fraction_of_peak']:.1%} "
                                 "of matmul")
    if "peak_memory" in r:
        add("peak memory", f"{_bytes(r['peak_memory']['bytes'])} ({r['peak_memory']['kind']})")
    if "profile" in r:
        pr = r["profile"]
        add("profile (top ops)", "; ".join(f"{e['name']} {e['share']:.0%}" for e in pr["top"][:6]) +
            f" (of {pr['total_us'] / 1e3:.4g} ms self time; table: {pr['file']})")
    if r.get("host_syncs"):
        hs = r["host_syncs"]
        top = list(hs["where"].items())[:4]
        add("host syncs (one call)", f"{hs['count']}" + "".join(f"; {k} x{n}" for k, n in top))
    if "ablation" in r:
        a = r["ablation"]
        add(f"ablation (batch {a['batch']})", f"transformer phase with every optimisation on: {a['baseline_s']:.4g} s")
        for name, v in a["variants"].items():
            if "skipped" in v:
                add(f"  {name}", f"skipped: {v['skipped']}")
            else:
                same = f"same codes: {v['same_codes']}" if "same_codes" in v else \
                    f"same images: {v['same_images']}, max diff {v['max_abs_diff']:.2g}"
                phase = f"{v['phase']}: " if "phase" in v else ""
                add(f"  {name}", f"{phase}off {v['off_s']:.4g} s, on {v['on_s']:.4g} s: x{v['speedup']:.2f} ({same})")
    if "train" in r:
        t = r["train"]
        compiled = ", compiled" if t.get("compiled") else ""
        add(f"training (batch {t['batch']}{compiled})",
            f"{t['img_s']:.4g} img/s ({t['seconds_per_step']['median']:.4g} s per step), "
            f"{_rate(t['achieved_flops_per_s'])} = {t['fraction_of_peak']:.1%} of matmul")
    add("wall time", f"{r['wall_s']:.1f} s; load average {r['load_average_start'][0]:.2f} -> "
                     f"{r['load_average_end'][0]:.2f}")
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule, f"written: {r.get('out', '')}"])
