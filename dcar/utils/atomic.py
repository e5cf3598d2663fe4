"""Files written atomically: a temporary file in the target's folder, then ``os.replace`` onto the target.

A reader, or a rerun after a crash, sees either the previous file or the complete new one, never a partial file.
The temporary file is ``.<name>.<random>.tmp`` in the same folder (hidden, so globs such as ``*.png`` or GenEval's
``\\d+\\.png`` never pick it up) and is deleted when writing fails. Files get the permissions ``open(path, "w")``
gives (``0o666`` less the umask). There is no fsync: this guards against interrupted writers, not power loss
(:mod:`dcar.train.checkpoint` fsyncs and renames whole checkpoint folders).

:func:`atomic_path` is the primitive (a temporary path for any writer, e.g. ``safetensors.torch.save_model``);
:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_savez`,
:func:`atomic_save_image` and :func:`atomic_save_safetensors` write the usual kinds of file through it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

__all__ = ["atomic_path", "atomic_save_image", "atomic_save_safetensors", "atomic_savez", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text"]


def _new_temporary(path: Path) -> Path:
    """Create (exclusively, mode ``0o666`` less the umask) and return an empty ``.<name>.<random>.tmp`` next to
    ``path``."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary file next to ``path`` (its folder is created if needed) for the body to write; renamed
    onto ``path`` when the body returns, deleted when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` (encoded with ``encoding``) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> Path:
    """JSON (indent 2, keys in insertion order unless ``sort_keys``, a final newline) written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez`` written atomically (the file name is used as given: no ``.npz`` is appended)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(image: Image.Image, path: str | os.PathLike, format: str = "PNG", **options: Any) -> Path:
    """A PIL image encoded in memory (``format``, PIL save ``options``) and written atomically: an interrupted run
    never leaves a partial image that a rerun would take as done."""
    buf = io.BytesIO()
    image.save(buf, format=format, **options)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file(tensors, path, metadata)`` through a temporary file (no copy of the tensors'
    bytes in memory); the tensors must be contiguous and must not share storage, as for ``save_file``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=None if metadata is None else dict(metadata))
    return Path(path)
