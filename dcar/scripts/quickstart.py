"""The main job: train and evaluate the dcar pipeline end to end on the built-in shapes data (CPU, no downloads).

    python scripts/quickstart.py                 # full run, outputs in runs/quickstart
    python scripts/quickstart.py out=/tmp/qs seed=1
    python scripts/quickstart.py ci=true         # a few dozen steps per phase (seconds)

Re-running the same command after an interruption continues where it stopped. See dcar/quickstart.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dcar.cli import run_cli
from dcar.config import load_config


def main(argv: Sequence[str]) -> None:
    from dcar.quickstart import Quickstart, QuickstartConfig

    cfg = load_config(QuickstartConfig, argv)
    metrics = Quickstart(cfg, argv=list(argv)).run()
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"report: {cfg.out}/report.md")


if __name__ == "__main__":
    run_cli(main)
