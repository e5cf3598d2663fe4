"""Load a typed config: dataclass schema <- base YAML (``config=``) <- presets (``data=shapes``) <- CLI dotlist.

The layering follows 1d-tokenizer (OmegaConf + dotlist) with efficientvit's typed dataclass schemas. Every key is
checked against the schema *before* anything heavy is built, and errors say which key, where it came from, and
what the closest valid keys are::

    unknown key 'optim.lrr' on the command line (did you mean 'optim.lr'?)
    invalid choice 'foo' for 'stage'; valid choices: alternate, discrete, warmup
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcar.config.help import HELP_FLAGS, ConfigHelp, help_text, wants_help
from dcar.config.schema import field_types

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key, value or preset the schema does not accept."""


@dataclass(frozen=True)
class Preset:
    """A CLI key whose value names a YAML file: ``<key>=<name>`` merges ``<folder>/<name>.yaml`` into ``target``.

    ``target`` is a dotted config path ("" for the root). If ``record`` is set, the chosen name is also stored
    in that config field (so ``data=shapes`` leaves ``data.name == "shapes"`` in the resolved config).
    """

    key: str
    folder: Path
    target: str = ""
    record: str | None = None

    def choices(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.yaml"))

    def path(self, name: str) -> Path:
        path = self.folder / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"invalid choice {name!r} for '{self.key}'; valid choices: {', '.join(self.choices()) or '(none)'}"
            )
        return path


def schema_paths(schema: type) -> dict[str, dataclasses.Field | None]:
    """All dotted paths of a dataclass schema: leaves map to their Field, sub-configs to None."""
    out: dict[str, dataclasses.Field | None] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            typ = hints.get(f.name, f.type)
            if dataclasses.is_dataclass(typ):
                out[path] = None
                walk(typ, path + ".")
            else:
                out[path] = f

    walk(schema, "")
    return out


def _flatten(node: Any, prefix: str = "") -> Iterable[str]:
    """Dotted leaf paths of a nested mapping (lists are leaves)."""
    if isinstance(node, (Mapping, DictConfig)):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, (Mapping, DictConfig)) and len(value) > 0:
                yield from _flatten(value, path + ".")
            else:
                yield path
    else:
        yield prefix.rstrip(".")


def _free_form(path: str, paths: Mapping[str, dataclasses.Field | None]) -> bool:
    """True if ``path`` lies under a leaf typed as a free-form dict (any sub-keys allowed)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        f = paths.get(".".join(parts[:i]))
        if f is not None and "dict" in str(f.type).lower():
            return True
    return False


def check_keys(node: Any, paths: Mapping[str, dataclasses.Field | None], source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first key of ``node`` that the schema does not have."""
    for leaf in _flatten(node, prefix):
        if leaf in paths or _free_form(leaf, paths):
            continue
        leaves = [p for p, f in paths.items() if f is not None]
        close = difflib.get_close_matches(leaf, leaves, n=2, cutoff=0.75)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        parent = leaf
        while parent and (parent == leaf or parent not in paths):  # deepest existing ancestor
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        siblings = sorted(p.rsplit(".", 1)[-1] for p in paths if (p.rsplit(".", 1)[0] if "." in p else "") == parent)
        where = f"'{parent}'" if parent else "the top level"
        raise ConfigError(f"unknown key '{leaf}' {source}{hint}; valid keys under {where}: {', '.join(siblings)}")


def check_choices(cfg: DictConfig, paths: Mapping[str, dataclasses.Field | None]) -> None:
    """Raise :class:`ConfigError` when a field declared with ``choice(...)`` holds another value."""
    for path, f in paths.items():
        if f is None or "choices" not in f.metadata:
            continue
        value = OmegaConf.select(cfg, path)
        if value not in f.metadata["choices"]:
            raise ConfigError(
                f"invalid choice {value!r} for '{path}'; valid choices: {', '.join(sorted(f.metadata['choices']))}"
            )


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level, not {type(node).__name__}")
    return node


def _nest(target: str, node: DictConfig) -> DictConfig:
    for part in reversed(target.split(".") if target else []):
        node = OmegaConf.create({part: node})
    return node


def parse_argv(argv: Sequence[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` arguments; anything else is an error that says so."""
    pairs = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value on the command line, got {arg!r}")
        pairs.append((key.strip(), value))
    return pairs


def load_config(
    schema: type[T],
    argv: Sequence[str] = (),
    *,
    default_config: str | Path | None = None,
    presets: Sequence[Preset] = (),
) -> T:
    """Build a ``schema`` instance from defaults, a base YAML, presets and dotlist overrides (in that order).

    ``config=PATH`` on the command line replaces ``default_config``. The schema must have a ``config: str`` field,
    which records the base YAML used. Raises :class:`ConfigError` naming the offending key and its source, and
    :class:`~dcar.config.help.ConfigHelp` (after the same checks) when ``-h`` or ``--help`` is among the arguments:
    its text lists every key with the value the other arguments give it.
    """
    show_help = wants_help(argv)
    argv = [arg for arg in argv if arg not in HELP_FLAGS]
    paths = schema_paths(schema)
    by_key = {p.key: p for p in presets}
    base = default_config
    layers: list[tuple[str, DictConfig]] = []
    dotlist: list[str] = []
    chosen: list[tuple[Preset, str]] = []
    for key, value in parse_argv(argv):
        if key == "config":
            base = value
        elif key in by_key:
            preset = by_key[key]
            chosen.append((preset, value))
            path = preset.path(value)
            node = _load_yaml(path)
            check_keys(node, paths, f"in preset {path}", prefix=f"{preset.target}." if preset.target else "")
            layers.append((f"preset {path}", _nest(preset.target, node)))
            if preset.record:
                layers.append((f"preset {key}={value}", OmegaConf.from_dotlist([f"{preset.record}={value}"])))
        else:
            dotlist.append(f"{key}={value}")
    cli = OmegaConf.from_dotlist(dotlist)
    check_keys(cli, paths, "on the command line")
    if base:
        base_node = _load_yaml(Path(base))
        check_keys(base_node, paths, f"in {base}")
        layers.insert(0, (str(base), base_node))
        layers.append(("config=", OmegaConf.create({"config": str(base)})))
    layers.append(("the command line", cli))

    cfg = OmegaConf.structured(schema)
    for source, node in layers:
        source = "on the command line" if source == "the command line" else f"in {source}"
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(err).splitlines()[0]
            raise ConfigError(f"wrong value for '{key}' {source}: {msg}") from None
    check_choices(cfg, paths)
    if show_help:
        sources = [*([str(base)] if base else []), *(f"{p.key}={v}" for p, v in chosen),
                   *(["the command line"] if dotlist else [])]
        raise ConfigHelp(help_text(schema, cfg, sources))
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {str(err).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what every run directory records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: Any) -> dict:
    """The resolved config as a plain dict (for trackers and JSON)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out


__all__ = ["ConfigError", "Preset", "check_keys", "load_config", "schema_paths", "to_container", "to_yaml"]
