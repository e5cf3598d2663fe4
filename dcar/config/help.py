"""``--help`` for every ``key=value`` command: each key of the schema with the value the command would run with.

The keys, types and valid choices come from the dataclass schema; the explanation of each key is the comment
written beside (or directly above) its field in the schema's source, so the help and the code cannot drift apart.
The values are the resolved ones: schema defaults, then the base YAML, presets and overrides given with ``--help``
(``python scripts/train_generator.py config=configs/generator/shapes.yaml --help`` shows the shapes settings).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dcar.config.schema import field_types

HELP_FLAGS = ("-h", "--help")


class ConfigHelp(Exception):
    """Raised by :func:`dcar.config.load_config` when ``-h`` / ``--help`` is among the arguments; ``text`` is the
    help (``dcar.cli.run_cli`` prints it and exits with status 0)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def wants_help(argv: typing.Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment lines directly above a field's line, then the comment
    at the end of that line, joined into one text. Fields without comments are left out; so is everything when the
    source cannot be read (a class made in a REPL)."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    fields = {f.name for f in dataclasses.fields(cls)}
    lines = lines[next((i for i, line in enumerate(lines) if line.startswith("class ")), 0) + 1:]  # after decorators
    body = [line for line in lines if line.strip()]
    indent = len(body[0]) - len(body[0].lstrip()) if body else 0
    out: dict[str, str] = {}
    pending: list[str] = []  # the comment block right above the current line
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#") and len(line) - len(stripped) == indent:
            comment = stripped.lstrip("#").strip()
            # a "---- section ----" rule heads a group of fields and explains none of them
            pending = [] if comment.startswith("---") else [*pending, comment]
            continue
        match = re.match(rf"^ {{{indent}}}(\w+)\s*:", line)
        if match and match.group(1) in fields:
            parts = [*pending, _trailing_comment(line)]
            if text := " ".join(p for p in parts if p):
                out[match.group(1)] = text
        pending = []  # any other line (blank, a continuation, a method) ends a comment block
    return out


def _trailing_comment(line: str) -> str:
    """The ``# ...`` comment at the end of one line of code ("" when none or when the line does not tokenize on
    its own, e.g. the first line of a field spread over several)."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return ""


def _type_name(typ: Any) -> str:
    """``int``, ``float | None``, ``list[int]``: the annotation as written."""
    if isinstance(typ, type) and not typing.get_args(typ):
        return typ.__name__
    return str(typ).replace("typing.", "")


def _value(value: Any) -> str:
    """A value as it would be typed on the command line: YAML's true / false / null, "" for an empty string,
    [a, b] and {k: v} for lists and mappings."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return '""' if value == "" else str(value)


def help_text(schema: type, cfg: DictConfig, sources: typing.Sequence[str] = (), width: int = 118) -> str:
    """The key list of ``schema`` with the values of ``cfg`` (see the module docstring)."""
    lines = []
    if sources:
        lines.append("values from: schema defaults <- " + " <- ".join(sources))
    lines.append("keys (key=value on the command line; nested keys with dots):")

    def walk(cls: type, prefix: str, node: Any) -> None:
        hints = field_types(cls)
        comments = field_comments(cls)
        sections = []
        for f in dataclasses.fields(cls):  # a class's own keys first, then its sections
            typ = hints.get(f.name, f.type)
            value = node[f.name] if node is not None and f.name in node else None
            if dataclasses.is_dataclass(typ):
                sections.append((f.name, typ, value))
            else:
                lines.append(_leaf(f"{prefix}{f.name}", f, typ, value, comments.get(f.name, ""), width))
        for name, typ, value in sections:
            doc = (inspect.getdoc(typ) or "").split("\n\n")[0].replace("\n", " ")
            lines.extend(["", f"{prefix}{name}:" + (f"  {doc}" if doc else "")])
            walk(typ, f"{prefix}{name}.", value)

    walk(schema, "", cfg)
    return "\n".join(lines)


def _leaf(path: str, f: dataclasses.Field, typ: Any, value: Any, comment: str, width: int) -> str:
    """``  path = value  (type[: choices])  # comment``, the comment wrapped below when the line would be too long."""
    kind = _type_name(typ)
    if "choices" in f.metadata:
        kind += ": " + " | ".join(f.metadata["choices"])
    line = f"  {path} = {_value(value)}  ({kind})"
    if comment and len(line) + 4 + len(comment) <= width:
        return f"{line}  # {comment}"
    if comment:
        line += "\n" + "\n".join(textwrap.wrap(comment, width=width, initial_indent=" " * 6 + "# ",
                                               subsequent_indent=" " * 8))
    return line


__all__ = ["HELP_FLAGS", "ConfigHelp", "field_comments", "help_text", "wants_help"]
