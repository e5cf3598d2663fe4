"""Safe image loading for the data readers.

:func:`load_rgb` is the single entry point every reader uses to turn a file (or the bytes of a tar member) into an
RGB :class:`PIL.Image.Image`. It never raises for bad data: corrupt, truncated, zero-byte, missing or oversized
("decompression bomb") images give ``None`` and a warning naming the source, and the collate function
(:func:`dcar.data.collate.collate`) drops and counts them.

Mode handling (everything comes out as 8-bit ``RGB``):

* ``RGB``: returned as is.
* alpha modes (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palette images with a ``transparency`` entry) are
  **alpha-composited on a white background**: a transparent pixel becomes white, a half-transparent red pixel
  becomes pink. White matches how these images are shown on the web (the source of most caption data).
* 16-bit / 32-bit integer greyscale (``I;16*``, ``I``) is rescaled from ``0..65535`` to ``0..255`` (PIL's own
  ``convert("RGB")`` clips these to 255 instead, turning most 16-bit images white). Values of an ``I`` image are
  read as 16-bit samples, which is what PIL produces for 16-bit PNG/TIFF files.
* ``F`` (float) greyscale is clipped to ``0..255`` (PIL's conversion).
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) goes through PIL's
  ``convert("RGB")``. Embedded ICC profiles and EXIF orientation are ignored, as in the ADM / DC-AE evaluators.

Truncated files are rejected because PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` defaults to ``False``; this module
never changes it (nor ``Image.MAX_IMAGE_PIXELS``): the size limit is enforced per call with ``max_pixels``.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview

# 8192 x 8192: well above any training / evaluation image, well below what exhausts a data-loader worker's memory
# (an RGB image of this size is 192 MiB decoded). PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS, ~179 MP by
# default) still applies on top of this one.
DEFAULT_MAX_PIXELS = 8192 * 8192

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass
class SkipCounter:
    """Counts skipped samples by reason (per process; the collate's ``num_skipped`` is the cross-worker count)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def describe_source(source: ImageSource, name: str | None = None) -> str:
    """A short human-readable name for ``source`` used in log messages."""
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _white_composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_int_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(arr, 0.0, 65535.0) * (255.0 / 65535.0)
    grey = np.rint(arr).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _white_composite(img)
    if mode in _WIDE_INT_MODES:
        return _wide_int_to_rgb(img)
    return img.convert("RGB")


def load_rgb(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image | None:
    """Open and fully decode an image as 8-bit RGB, or return ``None`` (with a logged warning) if that fails.

    Args:
        source: a file path or the encoded bytes of an image.
        max_pixels: images with more than this many pixels are rejected *before* decoding (``None``: only PIL's
            own decompression-bomb limit applies).
        name: how to refer to the image in log messages (defaults to the path, or the byte count for bytes).

    Returns ``None`` for missing, zero-byte, corrupt, truncated, unsupported and oversized images.
    """
    label = describe_source(source, name)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                logger.warning("skipping image %s: empty data", label)
                return None
            fp: io.IOBase | str | os.PathLike = io.BytesIO(bytes(source))
        else:
            fp = source
            if os.path.isfile(fp) and os.path.getsize(fp) == 0:
                logger.warning("skipping image %s: zero-byte file", label)
                return None
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and 2x that and raises above; the warning is superseded by our own
            # explicit ``max_pixels`` check below, the error is caught like any other failure.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as opened:
                width, height = opened.size
                if max_pixels is not None and width * height > max_pixels:
                    logger.warning(
                        "skipping image %s: %dx%d = %d pixels exceeds max_pixels=%d",
                        label, width, height, width * height, max_pixels,
                    )
                    return None
                opened.load()  # full decode now: truncated / corrupt data fails here, not later in a transform
                rgb = to_rgb(opened)
                # closing ``opened`` releases its pixels, so hand back a detached copy when no conversion happened
                return rgb.copy() if rgb is opened else rgb
    except Image.DecompressionBombError as exc:
        logger.warning("skipping image %s: decompression bomb (%s)", label, exc)
    except FileNotFoundError:
        logger.warning("skipping image %s: file not found", label)
    except Exception as exc:  # any decoder failure means "unreadable sample", never a crash
        logger.warning("skipping image %s: unreadable (%s: %s)", label, type(exc).__name__, exc)
    return None
