"""Resumable, sharded image generation for the text-to-image evaluations (GenEval, ShapesEval, MJHQ-30K).

An evaluation describes its samples as fixed :class:`GenJob` s, one pipeline call each: the prompts, the PNG path of
every image and the seed of the call. Jobs never depend on the number of processes or on an interruption, so an
image is the same whichever process makes it and whenever. :func:`generate_missing` gives every process its
round-robin share of the jobs (:func:`dcar.eval.runner.my_share`), runs the jobs whose PNGs are not all on disk,
writes each missing PNG atomically (:func:`dcar.eval.runner.atomic_save_image`; existing PNGs are never rewritten)
and waits for all processes, so a stopped evaluation resumes where it stopped with identical images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dcar.config.loader import ConfigError
from dcar.eval import runner as R


@dataclass(frozen=True)
class GenJob:
    """One pipeline call: ``prompts[i]`` is written to ``paths[i]``; sampled with ``seed``; optional captioned grid.

    ``required``: how many leading paths must exist for the job to count as done (``None``: all of them). A batch
    whose tail lies beyond the evaluated prompts (MJHQ with ``num_prompts``) still draws, and writes, the whole batch.
    """

    prompts: tuple[str, ...]
    paths: tuple[Path, ...]
    seed: int
    grid: Path | None = None
    captions: tuple[str, ...] = field(default=())
    required: int | None = None

    def done(self) -> bool:
        """Every required PNG of the job is on disk."""
        return all(p.is_file() for p in self.paths[: self.required])


def generate_missing(pipe: Callable[..., Any] | None, jobs: Sequence[GenJob], pipe_kwargs: Mapping[str, Any],
                     ctx: R.DistContext | None = None, *, load_pipeline: Callable[[], Any] | None = None,
                     desc: str = "sampling", progress: bool = True) -> dict[str, int]:
    """Run this process's jobs that are not :meth:`GenJob.done` as ``pipe(prompts, seed=job.seed, **pipe_kwargs)``
    (images in [-1, 1]); returns the number of images generated and reused over all processes.

    ``pipe=None``: the pipeline comes from ``load_pipeline()``, called only when some job of this process is
    incomplete; without either, every PNG must exist (``ConfigError`` otherwise). Progress counts images.
    """
    from tqdm.auto import tqdm

    from dcar.train.logging import save_image_grid, to_uint8

    if ctx is None:
        ctx = R.dist_context()
    mine = [jobs[j] for j in R.my_share(len(jobs), ctx)]
    todo = [j for j in mine if not j.done()]
    if todo and pipe is None:
        if load_pipeline is None:
            raise ConfigError(f"{len(todo)} prompt(s) lack images (e.g. {todo[0].paths[0]}) and no pipeline is given")
        pipe = load_pipeline()
    made = 0
    with tqdm(total=sum(len(j.paths) for j in todo), desc=desc, unit="img",
              disable=not (progress and ctx.is_main)) as bar:
        for job in todo:
            images = pipe(list(job.prompts), seed=job.seed, **pipe_kwargs)  # type: ignore[misc]
            for path, pixels in zip(job.paths, to_uint8(images).numpy(), strict=True):
                if not path.is_file():
                    R.atomic_save_image(Image.fromarray(pixels), path)
                    made += 1
            if job.grid is not None:
                save_image_grid(images, job.grid, len(job.paths), list(job.captions) or None)
            bar.update(len(job.paths))
    counts = ctx.gather([(made, sum(len(j.paths) for j in mine) - made)])
    ctx.barrier()
    return {"generated": sum(c[0] for c in counts), "reused": sum(c[1] for c in counts)}


__all__ = ["GenJob", "generate_missing"]
