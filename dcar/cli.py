"""Shared command-line plumbing for ``scripts/``: where presets live, logging, clean config errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dcar.config.help import ConfigHelp
from dcar.config.loader import ConfigError, Preset


def configs_dir() -> Path:
    """The config YAMLs: ``$DCAR_CONFIGS``, else the ones installed with the package (``dcar/configs``, which the
    repository's top-level ``configs`` links to), so a wheel install finds the paper and shapes configs too."""
    if env := os.environ.get("DCAR_CONFIGS"):
        return Path(env)
    return Path(__file__).resolve().parent / "configs"


def data_preset() -> Preset:
    """``data=<name>`` picks ``configs/data/<name>.yaml`` and records the name in ``data.name``."""
    return Preset("data", configs_dir() / "data", target="data", record="data.name")


def run_cli(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`ConfigError` or a missing file prints one clear line and exits with status 2
    (no traceback; ``DCAR_TRACEBACK=1`` raises the missing file's error as usual); ``-h`` / ``--help`` prints the
    script's docstring and every config key with its value, and exits with 0."""
    logging.basicConfig(level=os.environ.get("DCAR_LOGLEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except ConfigHelp as help_:
        doc = (sys.modules[main.__module__].__doc__ or "").strip()
        print(f"{doc}\n\n{help_.text}" if doc else help_.text)
        sys.exit(0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as err:  # a mistyped path: its message names the path, a traceback adds nothing
        if os.environ.get("DCAR_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {err} (DCAR_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        sys.exit(2)
