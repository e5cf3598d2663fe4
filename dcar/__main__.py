"""``dcar <command> key=value ...`` / ``python -m dcar <command> ...``: the scripts of ``scripts/`` (installed with
the package as :mod:`dcar.scripts`) by name, so a wheel install runs them without a checkout.

    dcar                                   # the commands, one line each
    dcar sample pipeline=runs/pipe prompts="a red circle" out=samples
    dcar train-tokenizer config=configs/tokenizer/shapes.yaml stage=warmup    # "-" and "_" are the same
    dcar benchmark --help                  # a command's keys, as `python scripts/benchmark.py --help`
"""

from __future__ import annotations

import ast
import difflib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["commands", "main", "summary"]


def commands() -> dict[str, Path]:
    """``{name: script}`` of every script in :mod:`dcar.scripts`, sorted by name."""
    folder = Path(__file__).resolve().parent / "scripts"
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


def summary(script: Path, width: int = 96) -> str:
    """The first paragraph of a script's docstring on one line, cut at a word to ``width`` characters (read
    without importing the script)."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0] + " ..."


def usage() -> str:
    cmds = commands()
    width = max(len(n) for n in cmds)
    lines = [f"  {name.replace('_', '-'):<{width}}  {summary(path)}" for name, path in cmds.items()]
    return ("usage: dcar <command> [key=value ...]   (dcar <command> --help: the command's keys)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the script named by ``argv[0]`` as ``__main__`` with the rest of ``argv`` as its command line; no
    command: the list (exit status 2; ``-h`` / ``--help``: 0); an unknown one: an error naming the closest ones."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    cmds = commands()
    name = args[0].replace("-", "_")
    if name not in cmds:
        close = difflib.get_close_matches(name, cmds, n=3)
        hint = f" (did you mean {', '.join(c.replace('_', '-') for c in close)}?)" if close else ""
        print(f"error: unknown command {args[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [str(cmds[name]), *args[1:]]
    runpy.run_path(str(cmds[name]), run_name="__main__")


if __name__ == "__main__":
    main()
