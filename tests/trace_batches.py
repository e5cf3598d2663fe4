"""Test-only wrapper: run a training script and record which samples each process consumed.

    torchrun --nproc_per_node 2 tests/trace_batches.py scripts/train_tokenizer.py key=value ...

Every batch the trainer draws is appended to ``<run.dir>/batches.rank<R>.jsonl`` as
``{"micro_step": s, "index": [...]}`` (the samples' ``index`` field; shapes data carries one) before the step uses
it. Nothing else changes: the script runs as ``__main__`` with its own arguments.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Iterator
from typing import Any

from dcar.train.trainer import Trainer

_batches = Trainer.batches


def traced_batches(self: Trainer) -> Iterator[dict[str, Any]]:
    path = self.run_dir / f"batches.rank{self.accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    step = self.micro_step
    for batch in _batches(self):
        with open(path, "a") as f:
            f.write(json.dumps({"micro_step": step, "index": batch["index"].tolist()}) + "\n")
        step += 1
        yield batch


if __name__ == "__main__":
    Trainer.batches = traced_batches  # type: ignore[method-assign]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
