"""The step-based training loop every dcar trainer shares: exact resume, atomic checkpoints, NaN policy, logging.

A concrete trainer (tokenizer, generator) subclasses :class:`Trainer` and supplies its modules, data and one
``train_step``; the loop around it is here, written once (DiT's readable loop, VAR's trainer-owns-its-state resume):

* the data position is the step: :class:`~dcar.data.sampler.ResumableBatchSampler` resumes at ``start_step``;
* every step reseeds torch / numpy / random from ``(seed, rank, step)``, so randomness inside a step (mask ratios,
  noise, path choice) is identical whether or not the run was interrupted before it;
* a non-finite loss or gradient skips the update; after ``train.max_bad_steps`` consecutive bad steps the run
  aborts with :class:`TrainingAborted`, and a checkpoint never holds non-finite weights;
* checkpoints are written atomically (:mod:`dcar.train.checkpoint`); the final model goes to ``<run.dir>/final``
  with ``save_pretrained``;
* with several processes, logged scalars are means over processes (``data_skipped`` a sum), and a collective that
  fails or waits longer than ``train.dist_timeout_s`` (a process died or stalled) raises :class:`LostProcesses`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from dcar.config.schema import TrainConfig
from dcar.data.collate import collate
from dcar.data.sampler import ResumableBatchSampler
from dcar.train import checkpoint as ckpt
from dcar.train.ema import EMA
from dcar.train.logging import MetricsLogger
from dcar.train.optim import build_optimizer, build_scheduler
from dcar.train.run_dir import prepare_run_dir
from dcar.train.runtime import (
    build_accelerator,
    check_process_group,
    compile_for_training,
    retained_graph_compile,
    rng_state,
    seed_everything,
    set_rng_state,
    step_seed,
)
from dcar.utils.denormal import flush_denormal

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


class LostProcesses(RuntimeError):
    """Raised when a collective with the other processes failed or timed out (a rank died or stalled)."""


# what gloo / NCCL / c10d errors say when a peer is gone or a collective timed out
_PEER_FAILURE = re.compile(r"timed out|timeout|connection (reset|closed|refused)|broken pipe|peer|socket|"
                           r"gloo|nccl|process group", re.IGNORECASE)


class Trainer(ABC):
    """Base class: subclasses implement :meth:`build_modules`, :meth:`build_dataset` and :meth:`train_step`.

    ``train_step`` calls :meth:`optimize` once per optimizer it updates (e.g. generator, then discriminator) and
    returns a dict of scalars to log. Modules named in :meth:`build_modules` are prepared by accelerate,
    checkpointed, and (``"model"``) averaged by EMA when ``train.ema_decay > 0``.
    """

    # the step runs backward through one graph more than once (retain_graph=True): under train.compile the loop
    # then runs with runtime.retained_graph_compile's settings
    backward_twice: bool = False

    def __init__(self, cfg: TrainConfig, accelerator: Any | None = None, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.accelerator = accelerator or build_accelerator(cfg)
        check_process_group(self.accelerator)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.argv = argv
        self.step = 0
        self.bad_steps = 0  # total skipped updates
        self.consecutive_bad = 0
        self.data_skipped = 0  # unreadable samples dropped by the readers
        self._step_bad = False
        self._bad_opts: set[str] = set()  # optimizers whose update this step is skipped
        self._micro = 0  # micro-batch index within the step (gradient accumulation)
        # called with the step number after every optimizer step (e.g. the quickstart hands CPU threads back to
        # the generator when the tokenizer stage running beside it ends)
        self.step_hooks: list[Callable[[int], None]] = []

    # ----------------------------------------------------------------- subclass API
    @abstractmethod
    def build_modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name; ``"model"`` is the one exported and EMA-averaged."""

    @abstractmethod
    def build_dataset(self) -> Dataset:
        """The training dataset (map-style, or an IterableDataset with ``set_start(samples)``)."""

    @abstractmethod
    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One optimisation step on ``batch``: compute losses, call :meth:`optimize`, return scalars to log."""

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per module by default (override for frozen parts or LR multipliers)."""
        return {name: build_optimizer([m], self.cfg.optim) for name, m in self.modules.items()
                if any(p.requires_grad for p in m.parameters())}

    def on_checkpoint(self, step: int) -> None:  # noqa: B027 - an optional hook, not abstract
        """Hook after each checkpoint (e.g. write reconstruction grids); does nothing by default."""

    def export_model(self) -> nn.Module:
        """The model written to ``<run.dir>/final``: the EMA weights if EMA is on, else the live model."""
        return self.ema.shadow if self.ema is not None else self.unwrap("model")

    def load_init(self, path: str) -> None:
        """Initialise ``model`` weights from ``init_from`` (a ``save_pretrained`` folder or a checkpoint)."""
        path_ = Path(path)
        model = self.unwrap("model")
        if (path_ / "model.safetensors").is_file():
            ckpt.load_module(model, path_ / "model.safetensors")
        else:
            raise FileNotFoundError(f"init_from={path}: expected a folder with model.safetensors "
                                    "(a run's final/ folder or a checkpoint)")

    # ----------------------------------------------------------------- helpers for train_step
    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.modules[name], keep_torch_compile=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def optimize(self, name: str, loss: torch.Tensor) -> bool:
        """Backward (``loss / grad_accum``) for optimizer ``name``; on the step's last micro-batch also clip and
        step. A non-finite loss or gradient on any rank skips the whole update; returns whether it was (or, before
        the last micro-batch, still is) going to be applied."""
        opt = self.optimizers[name]
        accum = self.cfg.train.grad_accum
        last = self._micro == accum - 1
        if name in self._bad_opts or not self._all_finite(loss.detach()):
            if name not in self._bad_opts:
                logger.warning("step %d: non-finite %s loss (%s); update skipped", self.step, name, loss.item())
            self._bad_opts.add(name)
            self._step_bad = True
            if last:
                opt.zero_grad(set_to_none=True)
            return False
        sync = last or self.accelerator.num_processes == 1 or name not in self.modules
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.modules[name]):
            self.accelerator.backward(loss / accum)
        if not last:
            return True
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.cfg.train.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.cfg.train.grad_clip)
        else:
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        if not self._all_finite(torch.as_tensor(norm, device=self.device)):
            opt.zero_grad(set_to_none=True)
            self._step_bad = True
            logger.warning("step %d: non-finite %s gradient; update skipped", self.step, name)
            return False
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        self._grad_norms[name] = float(norm)
        return True

    def _mean_over_processes(self, logs: dict[str, Any]) -> dict[str, Any]:
        """Logged scalars averaged over processes: with equal per-process batches, the global-batch mean."""
        if self.accelerator.num_processes == 1:
            return logs
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device)
        values = self.accelerator.reduce(values, "mean")
        return {**logs, **dict(zip(keys, values.tolist(), strict=True))}

    def _total_data_skipped(self) -> int:
        """Unreadable samples dropped so far by all processes (each counts its own share of the data)."""
        if self.accelerator.num_processes == 1:
            return self.data_skipped
        count = torch.tensor([self.data_skipped], dtype=torch.int64, device=self.device)
        return int(self.accelerator.reduce(count, "sum").item())

    def _all_finite(self, value: torch.Tensor) -> bool:
        ok = torch.isfinite(value).all().to(self.device, torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            ok = self.accelerator.gather(ok).min().reshape(1)
        return bool(ok.item() > 0)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build everything and restore the newest state; called by :meth:`fit`."""
        cfg, acc = self.cfg, self.accelerator
        seed_everything(step_seed(cfg.seed, 0, -1))  # identical init on every rank
        if acc.is_main_process:
            prepare_run_dir(self.run_dir, cfg, self.argv)
        self.dataset = self.build_dataset()
        self.modules = self.build_modules()
        if "model" not in self.modules:
            raise ValueError("build_modules() must return a module named 'model'")
        for m in self.modules.values():
            m.to(self.device)
        self.ema = EMA(self.modules["model"], cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.optimizers = self.build_optimizers()
        self.schedulers = {n: build_scheduler(o, cfg.train.steps, cfg.optim) for n, o in self.optimizers.items()}
        names = list(self.modules)
        prepared = acc.prepare(*self.modules.values(), *self.optimizers.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.modules = dict(zip(names, prepared[: len(names)], strict=True))
        if cfg.train.compile:
            self.modules = {n: compile_for_training(m, cfg.train.compile_mode, cfg.train.compile_backend)
                            for n, m in self.modules.items()}
        self.optimizers = dict(zip(self.optimizers, prepared[len(names):], strict=True))
        self._grad_norms: dict[str, float] = {}

        source = self.resume_source()
        if source is not None:
            self.restore(source)
        elif cfg.init_from:
            self.load_init(cfg.init_from)
            if self.ema is not None:
                self.ema.shadow.load_state_dict(self.unwrap("model").state_dict())
        self.metrics = MetricsLogger(self.run_dir, acc, cfg.log.wandb, cfg.log.project,
                                     config=None if cfg.log.wandb == "disabled" else _as_dict(cfg),
                                     run_name=cfg.run.name)

    def resume_source(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.ckpt_dir)
        path = Path(resume)
        if not ckpt.is_complete(path):
            raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder (expected meta.json, "
                                    "state.pt and *.safetensors)")
        return path

    # ----------------------------------------------------------------- state
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        mods = {name: self.unwrap(name) for name in self.modules}
        if self.ema is not None:
            mods["ema"] = self.ema.shadow
        return mods

    def training_state(self) -> dict[str, Any]:
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (main process), then wait for every rank."""
        self.accelerator.wait_for_everyone()
        path = None
        data_skipped = self._total_data_skipped()
        if self.accelerator.is_main_process:
            meta = {"samples_seen": self.step * self.global_batch, "bad_steps": self.bad_steps,
                    "data_skipped": data_skipped, "world_size": self.accelerator.num_processes}
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.checkpoint_modules(),
                                        self.training_state(), meta, keep_last=self.cfg.train.keep_last)
            self.on_checkpoint(self.step)
        self.accelerator.wait_for_everyone()
        return path

    def restore(self, path: Path) -> None:
        state, meta = ckpt.load_checkpoint(path, self.checkpoint_modules())
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(meta["step"])
        self.bad_steps = int(meta.get("bad_steps", 0))
        # the checkpoint holds the total over processes: rank 0 carries it on, the others count from zero again
        self.data_skipped = int(meta.get("data_skipped", 0)) if self.accelerator.is_main_process else 0
        logger.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------- data
    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.accelerator.num_processes

    @property
    def micro_step(self) -> int:
        """The data position in micro-batches (what the samplers count)."""
        return self.step * self.cfg.train.grad_accum

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current data position onwards (this rank's share)."""
        acc = self.accelerator
        bs = self.cfg.train.batch_size
        if isinstance(self.dataset, IterableDataset):  # e.g. webdataset shards, sharded by rank inside
            yield from self._iterable_batches(bs)
            return
        sampler = ResumableBatchSampler(len(self.dataset), bs, seed=self.cfg.data.seed, rank=acc.process_index,
                                        world_size=acc.num_processes, start_step=self.micro_step)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=self.cfg.train.num_workers)
        yield from map(self._to_device, loader)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _iterable_batches(self, bs: int) -> Iterator[dict[str, Any]]:
        """Epoch after epoch of a streaming dataset (``set_epoch(epoch, skip)`` + ``count_samples()``); with
        ``drop_last`` every epoch yields the same number of batches, so the position is exact from the step."""
        if hasattr(self.dataset, "batch_size"):  # hand whole batches to DataLoader workers (exact order)
            self.dataset.batch_size = bs
        per_epoch = self.dataset.count_samples() // bs
        if per_epoch == 0:
            raise ValueError(f"the dataset has fewer samples per rank than train.batch_size={bs}")
        epoch, offset = divmod(self.micro_step, per_epoch)
        while True:
            self.dataset.set_epoch(epoch, skip=offset * bs)
            loader = DataLoader(self.dataset, batch_size=bs, collate_fn=collate, drop_last=True,
                                num_workers=self.cfg.train.num_workers)
            yield from map(self._to_device, loader)
            epoch, offset = epoch + 1, 0

    # ----------------------------------------------------------------- the loop
    def fit(self) -> Path:
        """Train to ``train.steps`` (calling :meth:`setup` first unless done); return the ``final`` folder."""
        if not hasattr(self, "modules"):
            self.setup()
        cfg, acc = self.cfg, self.accelerator
        for m in self.modules.values():
            m.train()
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.log.progress))
        data = self.batches()
        with (self._lost_processes_guard(), flush_denormal(cfg.train.flush_denormal),
              retained_graph_compile(cfg.train.compile and self.backward_twice)):
            self._loop(data, bar)
        bar.close()
        final = self.run_dir / "final"
        if acc.is_main_process:
            model = self.export_model()
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(final)
            else:
                from safetensors.torch import save_model

                final.mkdir(parents=True, exist_ok=True)
                save_model(model, str(final / "model.safetensors"))
        with self._lost_processes_guard():
            acc.wait_for_everyone()
        self.metrics.close()
        return final

    def _loop(self, data: Iterator[dict[str, Any]], bar: Any) -> None:
        """Steps from ``self.step`` to ``train.steps``: train, count bad steps, log, checkpoint."""
        cfg, acc = self.cfg, self.accelerator
        t_last, last_step = time.perf_counter(), self.step
        while self.step < cfg.train.steps:
            self._step_bad, self._bad_opts = False, set()
            for micro in range(cfg.train.grad_accum):
                batch = next(data)
                self.data_skipped += int(batch.pop("num_skipped", 0))
                seed_everything(step_seed(cfg.seed, acc.process_index, self.step * cfg.train.grad_accum + micro))
                self._micro = micro
                logs = self.train_step(batch, self.step)
            if self._step_bad:
                self.bad_steps += 1
                self.consecutive_bad += 1
                if self.consecutive_bad >= cfg.train.max_bad_steps:
                    raise TrainingAborted(
                        f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient (up to step "
                        f"{self.step}); aborting. The last good checkpoint is in {self.ckpt_dir}. Lower optim.lr, "
                        "use train.mixed_precision=bf16 instead of fp16, or raise train.max_bad_steps.")
            else:
                self.consecutive_bad = 0
                if self.ema is not None:
                    self.ema.update(self.unwrap("model"))
            self.step += 1
            bar.update(1)
            for hook in self.step_hooks:
                hook(self.step)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                logs = {**logs, **{f"grad_norm/{k}": v for k, v in self._grad_norms.items()},
                        "lr": self.schedulers["model"].get_last_lr()[0] if "model" in self.schedulers else 0.0,
                        "steps_per_s": (self.step - last_step) / max(now - t_last, 1e-9)}
                logs = {**self._mean_over_processes(logs), "bad_steps": self.bad_steps,
                        "data_skipped": self._total_data_skipped()}
                t_last, last_step = now, self.step
                self.metrics.log(logs, self.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
            if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.steps:
                self.save()

    @contextlib.contextmanager
    def _lost_processes_guard(self) -> Iterator[None]:
        """Turn a failed or timed-out collective into :class:`LostProcesses` with what happened and what to do."""
        try:
            yield
        except RuntimeError as err:
            acc = self.accelerator
            if acc.num_processes == 1 or isinstance(err, TrainingAborted) or not _PEER_FAILURE.search(str(err)):
                raise
            newest = ckpt.latest_checkpoint(self.ckpt_dir)
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LostProcesses(
                f"process {acc.process_index} of {acc.num_processes} lost contact with the others at step "
                f"{self.step}: a collective failed or waited longer than train.dist_timeout_s="
                f"{self.cfg.train.dist_timeout_s:g} s, so another process died or stalled. Newest checkpoint: "
                f"{newest or 'none yet'}; restart the whole job with resume=auto. Cause: {cause}") from err


def _as_dict(cfg: Any) -> dict:
    from dcar.config.loader import to_container

    return to_container(cfg)
