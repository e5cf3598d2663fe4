"""The quickstart's evaluation phases (:mod:`dcar.quickstart`): tokenizer reconstructions, samples, ShapesEval with
and without the diffusion head, and the residual head's gain on ground-truth tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class EvalPhases:
    """Mixed into :class:`dcar.quickstart.Quickstart`, which provides ``cfg``, ``out``, ``tokenizer_dir`` and
    ``heldout``."""

    cfg: Any
    out: Path
    tokenizer_dir: Callable[[str], Path]
    heldout: Callable[[int], Any]

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

    @property
    def head_kwargs(self) -> dict[str, float]:
        return {"head_guidance_scale": self.cfg.head_guidance_scale, "head_temperature": self.cfg.head_temperature}

    def sampler_kwargs(self, use_head: bool = True) -> dict[str, Any]:
        """Keyword arguments of the pipeline call for samples and ShapesEval (the head's only with the head)."""
        return {"cfg_schedule": self.cfg.cfg_schedule, **(self.head_kwargs if use_head else {})}

    def pipeline(self):
        from dcar.pipeline import DCARPipeline

        return DCARPipeline.from_pretrained(self.out / "generator" / "pipeline")

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
