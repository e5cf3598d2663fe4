"""webdataset tar shards of image-caption pairs (iterable, rank-sharded, exactly resumable).

Samples are the same dicts as :mod:`dcar.data.captioned` yields (``None`` for unusable ones).

WebDataset shards: format and reader design
-------------------------------------------
The shards follow the webdataset convention: an uncompressed tar whose consecutive members sharing a key
(file name up to the first dot, e.g. ``000042.jpg`` + ``000042.txt``) form one sample. A sample needs an image
(``.jpg``, ``.jpeg``, ``.png`` or ``.webp``, first found in that order) and a caption (``.txt`` as UTF-8, else
``.json`` with a string ``"caption"``, else ``"text"`` key). Captions are stripped of surrounding whitespace.

The reader uses :mod:`tarfile` in random-access mode instead of the ``webdataset`` pipeline. Measured reasons:

* **exact sharding with no gaps or duplicates at any rank / worker count.** The sample stream is split at the
  *sample* level (position ``i`` belongs to rank ``i % world_size``), which needs every process to walk the same
  sequence of samples. With random access each process only reads the 512-byte tar headers of samples it does not
  own and seeks over their payloads. Measured on a 204 MB shard of 2000 samples (100 kB payloads), one process
  of a 16-way split read 14.9 MB with this reader and 203.8 MB through ``webdataset.WebDataset``, which reads and
  groups every byte of a shard before a sample can be dropped (0.2-0.3 s vs 0.4-0.7 s from the page cache on a
  shared 2-core machine; the byte ratio is what matters on network storage);
* **exact resume.** ``skip`` counts positions in a deterministic stream, so a resumed run continues with exactly
  the samples the uninterrupted run would have seen next, and skipped samples cost a header read, not a decode;
* **explicit damage handling.** A truncated shard (missing end-of-archive marker, a member cut short, a broken
  header) is detected, logged and counted; the samples before the damage are still produced and the next shard
  follows. An unreadable shard (not a tar, empty) is logged, counted and skipped;
* **lightweight shuffle buffer.** Buffered samples are ``(shard, offsets)`` records, not decoded bytes.

The limitation: shards must be local (or mounted) uncompressed ``.tar`` files; ``http://``/``s3://``/``pipe:``
URLs are rejected at construction, and a compressed shard fails to open (logged, counted as unreadable). Brace
patterns are expanded with ``braceexpand`` (a ``webdataset`` dependency).

Ordering, sharding and resume
-----------------------------
For epoch ``e`` the *rank stream* of one rank is built as follows:

1. shard order: the expanded shard list, permuted with ``random.Random(f"{seed}:{e}:shards")`` if ``shuffle``;
2. ``split_by="sample"`` (default): all shards are walked in that order and the global sample sequence
   (after an optional shuffle buffer, seeded by ``seed`` and ``e``) is dealt round-robin: rank ``r`` gets
   positions ``r, r + W, r + 2W, ...``. Ranks get the same number of samples up to one;
   ``split_by="shard"``: rank ``r`` walks only shards ``r, r + W, ...`` of the epoch order (no rank reads another
   rank's shards: use this for very large runs; ranks may then get different sample counts);
3. the first ``skip`` samples of the rank stream are dropped (resume: ``skip`` = samples this rank already
   consumed in epoch ``e``, i.e. ``steps * per_rank_batch_size``, counting skipped/``None`` samples too);
4. the remaining rank stream is dealt to DataLoader workers in blocks of ``batch_size`` samples (block ``b`` goes
   to worker ``b % num_workers``). With ``batch_size`` equal to the DataLoader's batch size, the loader's
   round-robin over workers hands out batches in exactly rank-stream order, so "samples consumed" is a position in
   that stream and resuming is exact for any number of workers.

Every position is yielded exactly once per epoch by exactly one (rank, worker): a sample that cannot be used
(corrupt image, no caption, no image, cut by a truncation) is yielded as ``None``, so positions never shift.
Per-process skip counts are in ``dataset.stats`` (in DataLoader workers each worker has its own copy; the
collate's ``num_skipped`` is the cross-worker count).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Literal

import braceexpand
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dcar.data.captioned import CAPTION_JSON_KEYS, DEFAULT_MAX_CAPTION_CHARS, IMAGE_EXTENSIONS, _truncate_caption
from dcar.data.io import DEFAULT_MAX_PIXELS, SkipCounter, load_rgb
from dcar.data.transforms import image_to_sample_tensor

logger = logging.getLogger(__name__)

_TAR_BLOCK = 512
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__), not samples
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key = path up to the first dot of the file name



@dataclass(frozen=True)
class _Record:
    """One sample's location: the shard, its key and ``ext -> (data offset, size)`` of its members."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a brace pattern (``shard-{000000..000009}.tar``), a directory (its ``*.tar`` files, sorted) or a list of
    either into a list of shard paths, checking that every shard exists.

    Raises:
        ValueError: a remote URL / ``pipe:`` spec, or nothing to read.
        FileNotFoundError: a listed shard or directory does not exist.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards: list[str] = []
    for item in items:
        spec = os.fspath(item)
        if "://" in spec or spec.startswith("pipe:"):
            raise ValueError(f"only local (or mounted) tar shards are supported, got {spec!r}")
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).iterdir() if p.is_file() and p.name.endswith(".tar"))
            if not found:
                raise ValueError(f"no .tar shards in directory {spec}")
            shards.extend(found)
        else:
            shards.extend(braceexpand.braceexpand(spec))
    if not shards:
        raise ValueError(f"no shards given: {urls!r}")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}{more}")
    compressed = [s for s in shards if not s.endswith(".tar")]
    if compressed:
        logger.warning("shards without a .tar suffix will be read as uncompressed tar: %s", compressed[:3])
    return shards


def _buffer_shuffle(records: Iterable[_Record], size: int, rng: random.Random) -> Iterator[_Record]:
    """Deterministic shuffle buffer: keep ``size`` records, emit a random one for each new record, drain at the end."""
    buffer: list[_Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = record
    rng.shuffle(buffer)
    yield from buffer


class _MemberReader:
    """Reads member payloads by (shard, offset, size), keeping a few shard files open (small LRU)."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, shard: str, offset: int, size: int) -> bytes | None:
        """The member's bytes, or ``None`` if the shard cannot be read or ends before the member does."""
        try:
            f = self._files.get(shard)
            if f is None:
                f = open(shard, "rb")  # noqa: SIM115 - kept open across calls, closed in close()
                self._files[shard] = f
                if len(self._files) > self.max_open:
                    self._files.popitem(last=False)[1].close()
            else:
                self._files.move_to_end(shard)
            f.seek(offset)
            data = f.read(size)
        except OSError as exc:
            logger.warning("cannot read %d bytes at offset %d of shard %s (%s)", size, offset, shard, exc)
            return None
        return data if len(data) == size else None

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


class WebDatasetCaptions(IterableDataset):
    """Image-caption samples from webdataset tar shards, deterministic, resumable, split across ranks and workers.

    Args:
        urls: a brace pattern, a directory of ``.tar`` files, or a list of shard paths / patterns.
        resolution: output side ``R`` (ADM centre crop).
        random_flip: random horizontal flip (torch's RNG; seeded per DataLoader worker).
        max_caption_chars: longer captions are truncated (counted in ``stats``; ``None`` disables).
        shuffle: permute the shard order and run a shuffle buffer, both seeded by ``seed`` and the epoch.
        shuffle_buffer: shuffle buffer size in samples (records are offsets, so large buffers are cheap).
        seed: shuffle seed (the same on every rank).
        epoch: epoch index used for shuffling (change it with :meth:`set_epoch`).
        skip: samples of this rank's stream to drop first (resume: samples this rank consumed in ``epoch``).
        rank, world_size: distributed position; ``None`` reads ``torch.distributed`` if initialised, else 0 / 1.
        split_by: ``"sample"`` (exact, every process walks all shard headers) or ``"shard"`` (each rank reads only
            its own shards); see the module docstring.
        batch_size: block size for dealing the rank stream to DataLoader workers; set it to the DataLoader's batch
            size so batches come out in stream order (exact resume with several workers).
        max_pixels: images above this many pixels are skipped.

    Yields ``{"image", "caption", "path"}`` (``path`` is ``"<shard>#<key>"``) or ``None`` for an unusable sample.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        resolution: int,
        random_flip: bool = False,
        max_caption_chars: int | None = DEFAULT_MAX_CAPTION_CHARS,
        *,
        shuffle: bool = False,
        shuffle_buffer: int = 5000,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        split_by: Literal["sample", "shard"] = "sample",
        batch_size: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(urls)
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.max_caption_chars = max_caption_chars
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.max_pixels = max_pixels
        if split_by not in ("sample", "shard"):
            raise ValueError(f"split_by must be 'sample' or 'shard', got {split_by!r}")
        self.split_by = split_by
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        if rank is None or world_size is None:
            dist_ok = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist_ok else 0)
            world_size = world_size if world_size is not None else (
                torch.distributed.get_world_size() if dist_ok else 1
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank/world_size: {rank}/{world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        if split_by == "shard" and len(self.shards) < self.world_size:
            raise ValueError(
                f"split_by='shard' needs at least one shard per rank: {len(self.shards)} shard(s), "
                f"world_size={self.world_size}; use split_by='sample'"
            )
        self.stats = SkipCounter()
        self.epoch = 0
        self.skip = 0
        self.set_epoch(epoch, skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch (shuffle order) and how many of this rank's samples to skip (resets to 0 by default).

        Call it before creating the DataLoader iterator (with ``persistent_workers=True`` workers keep the value
        they were started with).
        """
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch, self.skip = int(epoch), int(skip)

    # -- stream construction ------------------------------------------------------------------------------------

    def _scan_shard(self, shard: str, verbose: bool, stats: SkipCounter) -> Iterator[_Record]:
        """Walk the headers of one shard, yielding grouped sample records; detect, count and report damage."""
        log = logger.warning if verbose else logger.debug
        # Unbuffered: a header read then costs 512 bytes, not a buffer refill of payload we are about to seek over.
        try:
            raw = open(shard, "rb", buffering=0)  # noqa: SIM115 - closed in the finally below (generator)
        except OSError as exc:
            stats.add("unreadable_shards")
            log("skipping unreadable shard %s (%s: %s)", shard, type(exc).__name__, exc)
            return
        try:
            file_size = os.fstat(raw.fileno()).st_size
            tf = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - closed in the finally below
        except (tarfile.TarError, OSError) as exc:
            raw.close()
            stats.add("unreadable_shards")
            log("skipping unreadable shard %s (%s: %s)", shard, type(exc).__name__, exc)
            return
        damage: str | None = None
        current: dict[str, tuple[int, int]] = {}
        current_key: str | None = None
        try:
            while True:
                try:
                    info = tf.next()
                except (tarfile.TarError, OSError) as exc:
                    damage = f"{type(exc).__name__}: {exc}"
                    break
                if info is None:
                    break
                tf.members = []  # random-access mode remembers every member; we do not need them
                if not info.isreg() or _META_MEMBER.match(info.name):
                    continue
                if info.offset_data + info.size > file_size:
                    damage = f"member {info.name} is cut short"
                    break
                match = _KEY_EXT.match(info.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != current_key or ext in current:
                    if current_key is not None:
                        yield _Record(shard, current_key, current)
                    current_key, current = key, {}
                current[ext] = (info.offset_data, info.size)
            if damage is None:
                # A complete archive ends with a zero block where the next header would be.
                raw.seek(tf.offset)
                if raw.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
                    damage = f"no end-of-archive marker at byte {tf.offset} of {file_size}"
        finally:
            tf.close()
            raw.close()
        if current_key is not None:
            yield _Record(shard, current_key, current)
        if damage is not None:
            stats.add("truncated_shards")
            log("shard %s is truncated or damaged (%s); kept the samples before the damage", shard, damage)

    def _epoch_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(shards)
        if self.split_by == "shard":
            shards = shards[self.rank :: self.world_size]
        return shards

    def _rank_stream(self, verbose: bool, stats: SkipCounter) -> Iterator[_Record]:
        records: Iterator[_Record] = (
            r for shard in self._epoch_shards() for r in self._scan_shard(shard, verbose, stats)
        )
        if self.shuffle and self.shuffle_buffer > 1:
            salt = f":{self.rank}" if self.split_by == "shard" else ""
            rng = random.Random(f"{self.seed}:{self.epoch}:buffer{salt}")
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        if self.split_by == "sample" and self.world_size > 1:
            records = islice(records, self.rank, None, self.world_size)
        return records

    def count_samples(self) -> int:
        """Length of this rank's stream for the current epoch (before ``skip``); walks the shard headers."""
        return sum(1 for _ in self._rank_stream(verbose=False, stats=SkipCounter()))

    # -- iteration ----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Only one process per stream reports shard damage at warning level (every process walks the same headers).
        verbose = worker_id == 0 and (self.rank == 0 or self.split_by == "shard")
        stream = islice(self._rank_stream(verbose, self.stats), self.skip, None)
        reader = _MemberReader()
        try:
            for position, record in enumerate(stream):
                if (position // self.batch_size) % num_workers == worker_id:
                    yield self._load(record, reader)
        finally:
            reader.close()

    def _read_caption(self, record: _Record, reader: _MemberReader) -> str | None:
        if "txt" in record.members:
            data = reader.read(record.shard, *record.members["txt"])
            if data is not None:
                try:
                    return data.decode("utf-8").strip()
                except UnicodeDecodeError:
                    pass
        if "json" in record.members:
            data = reader.read(record.shard, *record.members["json"])
            try:
                meta = json.loads(data.decode("utf-8")) if data is not None else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = None
            if isinstance(meta, dict):
                for key in CAPTION_JSON_KEYS:
                    if isinstance(meta.get(key), str):
                        return meta[key].strip()
        return None

    def _load(self, record: _Record, reader: _MemberReader) -> dict[str, Any] | None:
        name = f"{record.shard}#{record.key}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in record.members), None)
        if image_ext is None:
            self.stats.add("missing_image")
            logger.warning("skipping sample %s: no image member (has %s)", name, sorted(record.members))
            return None
        caption = self._read_caption(record, reader)
        if caption is None:
            self.stats.add("missing_caption")
            logger.warning("skipping sample %s: no usable caption (.txt or .json with %s)", name,
                           "/".join(CAPTION_JSON_KEYS))
            return None
        data = reader.read(record.shard, *record.members[image_ext])
        if data is None:
            logger.warning("skipping sample %s: image member %s.%s cannot be read", name, record.key, image_ext)
        img = None if data is None else load_rgb(data, max_pixels=self.max_pixels, name=f"{name}.{image_ext}")
        if img is None:
            self.stats.add("corrupt_image")
            return None
        caption, truncated = _truncate_caption(caption, self.max_caption_chars)
        if truncated:
            self.stats.add("truncated_captions")
            # warn once per process, then quietly (a caption-heavy shard set would flood the log)
            log = logger.warning if self.stats.counts["truncated_captions"] == 1 else logger.debug
            log("sample %s: caption truncated to %d characters", name, self.max_caption_chars)
        image = image_to_sample_tensor(img, self.resolution, random_flip=self.random_flip)
        return {"image": image, "caption": caption, "path": name}
