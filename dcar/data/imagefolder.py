"""Class-conditional image folders (ImageNet layout) with the ADM centre crop.

Two layouts are accepted:

* **class folders** (``root/<class>/**/<image>``): every visible sub-folder of ``root`` is a class and its label is
  the index of its name in the sorted list of sub-folder names (the ImageNet / torchvision convention, so
  ``n01440764`` is class 0). Images directly inside ``root`` are ignored (with a warning) in this layout;
* **flat** (``root/<image>``, no sub-folder holds an image): every image gets label 0 and ``classes`` is empty.

The file list is sorted (by class, then by relative path inside the class folder; by name in the flat layout), so
indices are the same on every machine and every run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dcar.data.io import DEFAULT_MAX_PIXELS, load_rgb
from dcar.data.transforms import image_to_sample_tensor

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def _walk_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """All image files below ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderDataset(Dataset):
    """ImageNet-style folder -> ``{"image": (3, R, R) tensor in [-1, 1], "label": int, "path": str}``.

    ``__getitem__`` returns ``None`` (logged by :func:`dcar.data.io.load_rgb`) for an unreadable image; use
    :func:`dcar.data.collate.collate` to drop and count those.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
        ValueError: no file with one of ``extensions`` was found.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        random_flip: bool = False,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.extensions = _normalise_extensions(extensions)
        self.max_pixels = max_pixels
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder is not a directory: {self.root}")

        subdirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = {name: _walk_images(self.root / name, self.extensions) for name in subdirs}
        self.samples: list[tuple[str, int]]
        if any(per_class.values()):
            self.classes: list[str] = subdirs
            self.samples = [(str(path), label) for label, name in enumerate(subdirs) for path in per_class[name]]
            for name in subdirs:
                if not per_class[name]:
                    logger.warning("class folder %s has no images with extensions %s", self.root / name,
                                   ", ".join(self.extensions))
            loose = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in self.extensions]
            if loose:
                logger.warning("ignoring %d images directly inside %s (class-folder layout)", len(loose), self.root)
        else:
            self.classes = []
            flat = sorted(
                p for p in self.root.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in self.extensions
            )
            self.samples = [(str(path), 0) for path in flat]
        if not self.samples:
            raise ValueError(f"no images with extensions {', '.join(self.extensions)} found in {self.root}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, label = self.samples[index]
        img = load_rgb(path, max_pixels=self.max_pixels)
        if img is None:
            return None
        image = image_to_sample_tensor(img, self.resolution, random_flip=self.random_flip)
        return {"image": image, "label": label, "path": path}
