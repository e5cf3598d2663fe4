"""Train the DC-AR generator on top of a frozen DC-HT tokenizer.

    python scripts/train_generator.py config=configs/generator/shapes.yaml tokenizer=runs/tok/alternate/final
    accelerate launch --num_processes 8 scripts/train_generator.py tokenizer=PATH data=jsonl data.path=...
    # 512 px fine-tune from the 256 px model:
    accelerate launch scripts/train_generator.py config=configs/generator/dcar_512.yaml tokenizer=PATH \
        init_from=runs/dcar_256/final

Without ``config=`` the paper's 256 px DC-AR setting is used (configs/generator/dcar_256.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

from dcar.cli import run_cli
from dcar.train.cli import train_generator


def main(argv: Sequence[str]) -> None:
    print(f"saved {train_generator(argv)}")


if __name__ == "__main__":
    run_cli(main)
