"""`python -m pipelines.bench NAME [args]`: run the benchmark module `pipelines.bench.NAME` (its `main(argv)`)."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import textwrap
from pathlib import Path

from fewstep.cli import UserError, command

HERE = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("_"))


def summary(name: str) -> str:
    """The first sentence of a benchmark's docstring, read without importing it (they import torch, Ray)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    text = re.sub(r"^`[^`]*`:\s*", "", " ".join(doc.split("\n\n")[0].split()))
    first = re.split(r"(?<=[.?])\s", text, maxsplit=1)[0]
    return first[:1].upper() + first[1:]


def usage() -> str:
    lines = [f"usage: python -m pipelines.bench {{{','.join(available())}}} [args] [--help]", "",
             "Benchmarks: each prints figures measured in one run (none is a test); NAME --help for its options.", ""]
    lines += [textwrap.fill(f"  {name:<11} {summary(name)}", 116, subsequent_indent=" " * 14) for name in available()]
    return "\n".join(lines)


@command
def main(argv: list[str]) -> int:
    argv = [a for a in argv if a != "--debug"]  # the error path's flag, not the benchmark's
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in available():
        raise UserError(f"unknown benchmark {argv[0]!r}; available: {', '.join(available())}")
    importlib.import_module(f"pipelines.bench.{argv[0]}").main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
