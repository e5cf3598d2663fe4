"""Write image-caption data in the formats the readers accept (used by the tests and for converting data).

* :func:`write_jsonl_dataset`: ``out_dir/images/<index>.<fmt>`` plus ``out_dir/data.jsonl`` with one
  ``{"image": "images/<index>.<fmt>", "caption": ...}`` row per sample (paths relative to the JSONL's folder),
  read back by :class:`dcar.data.captioned.JsonlCaptionDataset`.
* :func:`write_webdataset_shards`: ``out_dir/<prefix>-000000.tar, ...``; sample ``i`` is the members
  ``<i:09d>.<fmt>`` and ``<i:09d>.txt`` (UTF-8 caption), read back by :class:`dcar.data.captioned.WebDatasetCaptions`.

Output is deterministic (fixed member mtimes and owners), so re-running a conversion gives identical bytes.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

from PIL import Image

_FORMATS = MappingProxyType({"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"})


def encode_image(img: Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode ``img`` as ``png`` (lossless), ``jpg``/``jpeg`` or ``webp`` bytes."""
    fmt = _FORMATS.get(image_format.lower())
    if fmt is None:
        raise ValueError(f"unsupported image format {image_format!r}; use one of {sorted(_FORMATS)}")
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": quality}))
    return buf.getvalue()


def write_jsonl_dataset(
    samples: Iterable[tuple[Image.Image, str]],
    out_dir: str | os.PathLike,
    *,
    image_format: str = "png",
    filename: str = "data.jsonl",
) -> Path:
    """Write ``(image, caption)`` pairs as images + a JSONL manifest; returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / filename
    ext = image_format.lower()
    with open(manifest, "w", encoding="utf-8") as f:
        for index, (img, caption) in enumerate(samples):
            rel = f"images/{index:09d}.{ext}"
            (out / rel).write_bytes(encode_image(img, ext))
            f.write(json.dumps({"image": rel, "caption": caption}, ensure_ascii=False) + "\n")
    return manifest


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_shards(
    samples: Iterable[tuple[Image.Image, str]],
    out_dir: str | os.PathLike,
    samples_per_shard: int,
    *,
    image_format: str = "png",
    prefix: str = "shard",
) -> list[Path]:
    """Write ``(image, caption)`` pairs into uncompressed webdataset tar shards; returns the shard paths in order."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = image_format.lower()
    shards: list[Path] = []
    it = iter(samples)
    index = 0
    for first in it:  # each pass writes one shard: ``first`` plus up to samples_per_shard - 1 more from ``it``
        shards.append(out / f"{prefix}-{len(shards):06d}.tar")
        with tarfile.open(shards[-1], mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for img, caption in itertools.chain([first], itertools.islice(it, samples_per_shard - 1)):
                key = f"{index:09d}"
                _add_member(tar, f"{key}.{ext}", encode_image(img, ext))
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                index += 1
    return shards
