"""Image-caption pairs from a JSONL manifest of ``{"image": path, "caption": text}`` rows (map-style).

Yields ``{"image": (3, R, R) float tensor in [-1, 1], "caption": str, "path": str}`` (ADM centre crop, see
:mod:`dcar.data.transforms`), or ``None`` for a sample that cannot be used; :func:`dcar.data.collate.collate`
drops those and reports them as ``num_skipped``. webdataset tar shards are read by :mod:`dcar.data.shards`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dcar.data.io import DEFAULT_MAX_PIXELS, load_rgb
from dcar.data.transforms import image_to_sample_tensor

logger = logging.getLogger(__name__)

DEFAULT_MAX_CAPTION_CHARS = 2048
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_JSON_KEYS: tuple[str, ...] = ("caption", "text")


def _truncate_caption(caption: str, max_chars: int | None) -> tuple[str, bool]:
    if max_chars is not None and len(caption) > max_chars:
        return caption[:max_chars], True
    return caption, False


# ----------------------------------------------------------------------------------------------------------------
# JSONL manifest
# ----------------------------------------------------------------------------------------------------------------


class JsonlCaptionDataset(Dataset):
    """A JSONL manifest of ``{"image": path, "caption": str}`` rows -> ``{"image", "caption", "path"}`` samples.

    Relative image paths are resolved against ``image_root`` if given, else against the JSONL file's folder;
    absolute paths are used as they are. Malformed lines (invalid JSON, not an object, missing ``image`` or
    ``caption``, non-string values) are skipped at load time, counted in ``num_malformed`` and logged with their
    line number; blank lines are ignored. Captions longer than ``max_caption_chars`` are truncated (counted in
    ``num_truncated``, one summary warning). ``__getitem__`` returns ``None`` for an unreadable image.

    Raises:
        FileNotFoundError: the JSONL file does not exist.
        ValueError: the file is empty or has no valid row.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int,
        image_root: str | os.PathLike | None = None,
        random_flip: bool = False,
        max_caption_chars: int | None = DEFAULT_MAX_CAPTION_CHARS,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.max_caption_chars = max_caption_chars
        self.max_pixels = max_pixels
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL caption file not found: {self.path}")
        base = Path(image_root) if image_root is not None else self.path.parent
        self.image_root = base

        self.samples: list[tuple[str, str]] = []
        self.num_malformed = 0
        self.num_truncated = 0
        first_truncated: int | None = None
        num_lines = 0
        # utf-8-sig: tolerate a byte-order mark written by some editors / Windows tools.
        with open(self.path, encoding="utf-8-sig", errors="strict") as f:
            for lineno, line in enumerate(f, start=1):
                num_lines += 1
                if not line.strip():
                    continue
                row = self._parse_line(line, lineno)
                if row is None:
                    self.num_malformed += 1
                    continue
                image, caption = row
                caption, truncated = _truncate_caption(caption, max_caption_chars)
                if truncated:
                    self.num_truncated += 1
                    first_truncated = first_truncated or lineno
                image_path = image if os.path.isabs(image) else str(base / image)
                self.samples.append((image_path, caption))
        if self.num_truncated:
            logger.warning(
                "%s: truncated %d caption(s) longer than max_caption_chars=%d (first at line %d)",
                self.path, self.num_truncated, max_caption_chars, first_truncated,
            )
        if self.num_malformed:
            logger.warning("%s: skipped %d malformed line(s)", self.path, self.num_malformed)
        if num_lines == 0:
            raise ValueError(f"JSONL caption file is empty: {self.path}")
        if not self.samples:
            raise ValueError(
                f"no valid rows in {self.path} ({self.num_malformed} malformed line(s)); expected one JSON object "
                'per line like {"image": "images/0001.jpg", "caption": "a photo of ..."}'
            )

    def _parse_line(self, line: str, lineno: int) -> tuple[str, str] | None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            logger.warning("%s:%d: skipping malformed line (invalid JSON: %s)", self.path, lineno, exc)
            return None
        if not isinstance(row, dict):
            logger.warning("%s:%d: skipping malformed line (not a JSON object)", self.path, lineno)
            return None
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image:
            logger.warning("%s:%d: skipping malformed line (missing or non-string \"image\")", self.path, lineno)
            return None
        if not isinstance(caption, str):
            logger.warning("%s:%d: skipping malformed line (missing or non-string \"caption\")", self.path, lineno)
            return None
        return image, caption.strip()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, caption = self.samples[index]
        img = load_rgb(path, max_pixels=self.max_pixels)
        if img is None:
            return None
        image = image_to_sample_tensor(img, self.resolution, random_flip=self.random_flip)
        return {"image": image, "caption": caption, "path": path}
