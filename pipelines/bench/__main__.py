"""`python -m pipelines.bench NAME [args]`: run the benchmark module `pipelines.bench.NAME` (its `main(argv)`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        wanted = f"unknown benchmark {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        raise SystemExit(f"{wanted}usage: python -m pipelines.bench {{{','.join(names)}}} [args]")
    importlib.import_module(f"pipelines.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
