"""Train DC-HT for one stage of the three-stage adaptation (warm-up, discrete, alternate).

    python scripts/train_tokenizer.py config=configs/tokenizer/shapes.yaml stage=warmup run.dir=runs/tok/warmup
    python scripts/train_tokenizer.py config=configs/tokenizer/shapes.yaml stage=discrete \
        run.dir=runs/tok/discrete init_from=runs/tok/warmup/final
    python scripts/train_tokenizer.py config=configs/tokenizer/shapes.yaml stage=alternate \
        run.dir=runs/tok/alternate init_from=runs/tok/discrete/final

Without ``config=`` the paper's DC-HT f32c32 setting is used. Multi-GPU: ``accelerate launch scripts/...``.
"""

from __future__ import annotations

from collections.abc import Sequence

from dcar.cli import run_cli
from dcar.train.cli import train_tokenizer


def main(argv: Sequence[str]) -> None:
    print(f"saved {train_tokenizer(argv)}")


if __name__ == "__main__":
    run_cli(main)
