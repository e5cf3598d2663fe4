"""Run directories: every run records its resolved config, its command line and the code version it ran."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dcar.config.loader import to_yaml
from dcar.utils.atomic import atomic_write_text


def git_commit(path: str | Path | None = None) -> dict[str, Any]:
    """The git commit (and whether the tree is dirty) of the checkout holding ``path`` (default: dcar's source)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def prepare_run_dir(run_dir: str | Path, cfg: Any, argv: list[str] | None = None) -> Path:
    """Create ``run_dir`` and write ``config.yaml``, ``command.txt`` and append to ``launches.jsonl``.

    ``launches.jsonl`` keeps one line per (re)start, so a resumed run's history stays visible.
    """
    import torch

    import dcar

    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if argv is None else argv)
    command = shlex.join([Path(sys.executable).name, *argv])
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    atomic_write_text(out / "command.txt", command + "\n")
    launch = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, **git_commit(),
        "dcar": dcar.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node(),
    }
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(launch) + "\n")
    return out
