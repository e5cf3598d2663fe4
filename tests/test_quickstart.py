"""The main job's CI variant: every phase runs, outputs exist with the right content, re-runs resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from dcar.config import load_config
from dcar.data.token_cache import TokenCacheDataset
from dcar.pipeline import DCARPipeline
from dcar.quickstart import Quickstart, QuickstartConfig


def test_quickstart_ci_runs_every_phase_and_resumes(tmp_path, torch_threads):
    cfg = load_config(QuickstartConfig, [f"out={tmp_path}", "ci=true", "progress=false", "seed=3"])
    t0 = time.perf_counter()
    metrics = Quickstart(cfg).run()
    wall = time.perf_counter() - t0
    tok = metrics["tokenizer"]
    assert set(tok) >= {"psnr_continuous", "psnr_discrete", "ssim_continuous", "codebook_usage"}
    assert 5.0 < tok["psnr_discrete"] < 60.0 and 0.0 < tok["codebook_usage"] <= 1.0
    ceiling = tok["shapes_eval_recon"]
    assert set(ceiling) == {"continuous", "discrete"} and all(set(v) == {"shape", "full"} for v in ceiling.values())
    assert all(v is None or 0.0 <= v <= 1.0 for s in ceiling.values() for v in s.values())
    assert set(metrics["wall_s"]) == {"tokenizer_warmup", "tokenizer_discrete", "tokenizer_merge",
                                      "tokenizer_alternate", "pretokenize", "generator", "eval_tokenizer", "pipeline",
                                      "samples", "shapes_eval_hybrid", "shapes_eval_discrete_only", "residual_gain",
                                      "total"}
    # the total is the wall clock, not the sum of phases that partly ran side by side
    assert abs(metrics["wall_s"]["total"] - wall) < 2.0
    assert metrics["wall_s"]["tokenizer_alternate"] > 0 and (tmp_path / "tokenizer" / "alternate.log").is_file()
    for name in ("hybrid", "discrete_only"):
        scores = metrics["shapes_eval"][name]
        assert set(scores) == {"color", "shape", "count", "relation", "full", "lighting"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
        assert scores["lighting"] is not None  # the quickstart's captions name the lighting (lighting=true)
        assert (tmp_path / "shapes_eval" / name / "shapes_eval.json").is_file()
    res = metrics["residual"]
    assert metrics["residual_gain_db"] == res["psnr_tokens_plus_sampled_residual"] - res["psnr_tokens"]
    assert abs(res["psnr_tokens"] - tok["psnr_discrete"]) < 3.0  # tokens alone == the discrete path (fewer images)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    report = (tmp_path / "report.md").read_text()
    assert f"| tokenizer.psnr_continuous | {tok['psnr_continuous']:.4g} |" in report and "seed: 3" in report
    grid = np.asarray(Image.open(tmp_path / "recon_grid.png"))
    assert grid.shape[0] > 3 * 128 and grid.shape[1] > 8 * 128  # 3 rows x 8 held-out images at 128 px
    samples = np.asarray(Image.open(tmp_path / "samples_grid.png"))
    assert samples.shape[0] > 2 * 128 and samples.shape[1] > 8 * 128  # 16 captioned samples, 8 per row
    cache = json.loads((tmp_path / "tokens" / "train" / "cache.json").read_text())
    assert cache["num_samples"] == 64 and cache["grid"] == [4, 4] and cache["source"]["data"] == "shapes"
    assert (tmp_path / "generator" / "pipeline" / "generator" / "model.safetensors").is_file()
    # caption features cached by pretokenize == those of the generator's own (exported) frozen text encoder
    assert cache["text_features"]
    cached = TokenCacheDataset(tmp_path / "tokens" / "train")
    states, mask = DCARPipeline.from_pretrained(tmp_path / "generator" / "pipeline").text_encoder.encode(
        [cached[i]["caption"] for i in range(4)])
    assert torch.allclose(torch.stack([cached[i]["text_states"] for i in range(4)]), states, atol=1e-6)
    assert torch.equal(torch.stack([cached[i]["text_mask"] for i in range(4)]), mask)
    # lit images and captions from the merge on; the first two stages train on the config's continuous exposures
    assert all(c.endswith((" in bright light", " in dim light")) for c in cached.captions)
    for stage, lit in (("warmup", False), ("discrete", False), ("merge", True), ("alternate", True)):
        assert (tmp_path / "tokenizer" / stage / "final" / "model.safetensors").is_file()
        assert OmegaConf.load(tmp_path / "tokenizer" / stage / "config.yaml").data.shapes.lighting is lit
    # the pipeline holds the finished tokenizer: the alternate stage's decoder on the merge phase's frozen codes
    merged, final = (load_file(str(tmp_path / "tokenizer" / s / "final" / "model.safetensors"))
                     for s in ("merge", "alternate"))
    piped = load_file(str(tmp_path / "generator" / "pipeline" / "tokenizer" / "model.safetensors"))
    assert piped.keys() == final.keys() and all(torch.equal(piped[k], final[k]) for k in final)
    assert all(torch.equal(merged[k], final[k]) for k in final if not k.startswith("decoder."))
    assert not all(torch.equal(merged[k], final[k]) for k in final if k.startswith("decoder."))

    # an interrupted run: the generator phase lost its final export and nothing after it ran
    state = json.loads((tmp_path / "state.json").read_text())
    for phase in ("generator", "eval_tokenizer", "pipeline", "samples", "shapes_eval_hybrid",
                  "shapes_eval_discrete_only", "residual_gain"):
        del state["wall_s"][phase]
    (tmp_path / "state.json").write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "generator" / "final")
    shutil.rmtree(tmp_path / "generator" / "pipeline")
    again = Quickstart(cfg).run()
    assert again["residual"] == res  # resumed from the phase's checkpoint: identical weights, identical metrics
    assert again["shapes_eval"] == metrics["shapes_eval"]
    assert again["wall_s"]["tokenizer_warmup"] == metrics["wall_s"]["tokenizer_warmup"]  # not re-run

    # one phase after another (overlap=false, and what a one-thread process does anyway) from the same merged codes:
    # the same alternate stage (it ran on one thread beside the generator above) and the same token cache
    seq_dir = tmp_path / "seq"
    for stage in ("warmup", "discrete", "merge"):
        shutil.copytree(tmp_path / "tokenizer" / stage, seq_dir / "tokenizer" / stage)
    done = {k: v for k, v in state["wall_s"].items() if k in ("tokenizer_warmup", "tokenizer_discrete", "tokenizer_merge")}
    (seq_dir / "state.json").write_text(json.dumps({"wall_s": done, "metrics": {}}))
    torch_threads(1)
    seq = Quickstart(dataclasses.replace(cfg, out=str(seq_dir), overlap=False)).run()
    assert not (seq_dir / "tokenizer" / "alternate.log").exists()
    assert set(seq["wall_s"]) == set(metrics["wall_s"])
    ours, theirs = (load_file(str(d / "tokenizer" / "alternate" / "final" / "model.safetensors"))
                    for d in (tmp_path, seq_dir))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = TokenCacheDataset(tmp_path / "tokens" / "train"), TokenCacheDataset(seq_dir / "tokens" / "train")
    assert torch.equal(a.tensors["indices"], b.tensors["indices"]) and a.captions == b.captions
    assert torch.allclose(a.tensors["residual"], b.tensors["residual"], atol=1e-4)


def test_quickstart_rejects_an_unknown_cfg_schedule_before_any_work(tmp_path):
    import pytest

    from dcar.config.loader import ConfigError
    from dcar.sampling import CFG_SCHEDULES

    with pytest.raises(ConfigError, match=r"invalid choice 'cosine' for 'cfg_schedule'; valid choices: constant, linear"):
        load_config(QuickstartConfig, [f"out={tmp_path / 'qs'}", "cfg_schedule=cosine"])
    field = next(f for f in dataclasses.fields(QuickstartConfig) if f.name == "cfg_schedule")
    assert field.metadata["choices"] == CFG_SCHEDULES  # the sampler's schedules, no more, no fewer
    assert not (tmp_path / "qs").exists()
    assert Quickstart(load_config(QuickstartConfig, [f"out={tmp_path / 'qs'}"])).sampler_kwargs(False) == {
        "cfg_schedule": "constant"}
