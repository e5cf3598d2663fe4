"""The training commands: ``scripts/train_tokenizer.py`` / ``scripts/train_generator.py`` and, for launching from
code (the quickstart runs a tokenizer stage beside the generator), ``python -m dcar.train {tokenizer,generator} ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dcar.cli import configs_dir, data_preset
from dcar.config import load_config
from dcar.config.help import HELP_FLAGS, ConfigHelp
from dcar.config.loader import ConfigError


def train_tokenizer(argv: Sequence[str], prog: str = "scripts/train_tokenizer.py") -> Path:
    """One DC-HT stage from ``key=value`` overrides (default config: the paper's f32c32); returns ``final/``."""
    from dcar.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    cfg = load_config(TokenizerTrainConfig, argv, default_config=configs_dir() / "tokenizer" / "dcht_f32c32.yaml",
                      presets=[data_preset()])
    return TokenizerTrainer(cfg, argv=[prog, *argv]).fit()


def train_generator(argv: Sequence[str], prog: str = "scripts/train_generator.py") -> Path:
    """DC-AR on a frozen DC-HT from ``key=value`` overrides (default config: 256 px DC-AR); returns ``final/``."""
    from dcar.train.generator import GeneratorTrainConfig, GeneratorTrainer

    cfg = load_config(GeneratorTrainConfig, argv, default_config=configs_dir() / "generator" / "dcar_256.yaml",
                      presets=[data_preset()])
    return GeneratorTrainer(cfg, argv=[prog, *argv]).fit()


COMMANDS: dict[str, Callable[[Sequence[str], str], Path]] = {"tokenizer": train_tokenizer,
                                                             "generator": train_generator}


def main(argv: Sequence[str]) -> None:
    """``python -m dcar.train COMMAND key=value ...``."""
    if argv and argv[0] in HELP_FLAGS:
        raise ConfigHelp(f"usage: python -m dcar.train {{{','.join(COMMANDS)}}} key=value ... "
                         "(-h after the command lists its keys)")
    if not argv or argv[0] not in COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        raise ConfigError(f"python -m dcar.train COMMAND ...: COMMAND must be one of {', '.join(COMMANDS)}; got {got}")
    final = COMMANDS[argv[0]](argv[1:], f"python -m dcar.train {argv[0]}")
    print(f"saved {final}")
