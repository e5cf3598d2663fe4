"""dcar: DC-AR (masked autoregressive text-to-image generation) on the DC-HT deep-compression hybrid tokenizer.

Heavy submodules are imported lazily, so ``import dcar`` is cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DCHT": "dcar.models.tokenizer",
    "DCHTConfig": "dcar.models.tokenizer",
    "build_tokenizer": "dcar.models.tokenizer",
    "DCAR": "dcar.models.generator",
    "DCARConfig": "dcar.models.generator",
    "build_generator": "dcar.models.generator",
    "DCARPipeline": "dcar.pipeline",
    "ShapesDataset": "dcar.data.shapes",
    "load_config": "dcar.config",
    "ConfigError": "dcar.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *_LAZY]
