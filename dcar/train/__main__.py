"""``python -m dcar.train {tokenizer,generator} key=value ...`` (see :mod:`dcar.train.cli`)."""

from dcar.cli import run_cli
from dcar.train.cli import main

if __name__ == "__main__":
    run_cli(main)
