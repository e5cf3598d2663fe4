"""Atomic, pickle-free training checkpoints.

Layout of one checkpoint (``<run.dir>/checkpoints/step_00001000/``)::

    <module>.safetensors   one per named module (model, ema, discriminator, ...)
    state.pt               optimizer / LR schedule / grad scaler / RNG states: tensors and plain containers only,
                           read back with ``torch.load(weights_only=True)`` so no pickled code ever runs
    meta.json              step, data position, file sizes; written last

A checkpoint is first written into a hidden ``.tmp-*`` sibling, every file is fsynced, and the folder is then
renamed into place (``os.replace`` is atomic on POSIX). A crash mid-save therefore leaves either the previous
checkpoint set or a ``.tmp-*`` folder that :func:`latest_checkpoint` never picks (and the next save removes once
the process that wrote it is gone).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8,})$")
META = "meta.json"
STATE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (non-finite weights, mismatched keys, corrupt files)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_finite(modules: Mapping[str, nn.Module]) -> None:
    """Refuse to persist non-finite weights (a NaN never reaches a checkpoint)."""
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"refusing to save: {name}.{key} contains NaN or inf")


def save_checkpoint(
    root: str | Path,
    step: int,
    modules: Mapping[str, nn.Module],
    state: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Write one checkpoint atomically under ``root`` and keep only the ``keep_last`` newest complete ones."""
    assert_finite(modules)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files: dict[str, int] = {}
        for name, module in modules.items():
            path = tmp / f"{name}.safetensors"
            save_model(module, str(path))
            files[path.name] = path.stat().st_size
        torch.save(dict(state), tmp / STATE)
        files[STATE] = (tmp / STATE).stat().st_size
        for name in files:
            _fsync(tmp / name)
        record = {"step": step, "files": files, "modules": sorted(modules), **(meta or {})}
        (tmp / META).write_text(json.dumps(record, indent=2, sort_keys=True))
        _fsync(tmp / META)
        if final.exists():  # re-saving the same step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last)
    return final


def is_complete(path: Path) -> bool:
    """True when ``meta.json`` exists and every file it lists has the recorded size."""
    meta_path = path / META
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first; ``.tmp-*`` and damaged folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    complete = []
    for _, path in sorted(found):
        if is_complete(path):
            complete.append(path)
        else:
            logger.warning("ignoring incomplete checkpoint %s", path)
    return complete


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (what ``resume=auto`` picks), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _writer_is_gone(tmp: Path) -> bool:
    """True when the process named in ``.tmp-step_X-<pid>`` no longer runs (e.g. a save cut short by ``kill -9``)."""
    pid = tmp.name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and ``.tmp-*`` folders left by this process or
    by one that no longer runs (a save interrupted by a crash)."""
    root = Path(root)
    complete = list_checkpoints(root)
    if keep_last > 0:
        for path in complete[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in root.glob(".tmp-step_*"):
        if tmp.name.endswith(f"-{os.getpid()}") or _writer_is_gone(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (missing or truncated files)")
    return json.loads((path / META).read_text())


def load_module(module: nn.Module, file: str | Path, *, strict: bool = True, skip: tuple[str, ...] = ()) -> None:
    """Load a safetensors file into ``module``; a mismatch lists the missing/unexpected/mis-shaped keys. Keys that
    start with a prefix in ``skip`` are neither loaded nor checked (the module keeps its own values)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(skip)}  # noqa: SIM118
    common = sorted(set(shapes) & set(own))
    wrong = {k: (shapes[k], tuple(own[k].shape)) for k in common if shapes[k] != tuple(own[k].shape)}
    if wrong:
        lines = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in ((k, *v) for k, v in sorted(wrong.items())))
        raise CheckpointError(f"{file} does not fit {type(module).__name__}: mismatched shapes {lines}")
    if skip:
        state = {k: v for k, v in load_file(str(file)).items() if not k.startswith(skip)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(skip)]
    else:
        missing, unexpected = load_model(module, str(file), strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{file} does not fit {type(module).__name__}: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)}"
        )


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the named modules in place; return ``(state, meta)``. Never unpickles arbitrary objects."""
    path = Path(path)
    meta = read_meta(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{path} has no weights for '{name}' (it holds {meta.get('modules')})")
        load_module(module, file)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return state, meta
