"""The documentation holds together: links resolve inside the repository, nothing points outside it, the README
stays a short user guide that starts with the two commands, and the config reference matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/work/|shared/docs")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed: a link inside code is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def relative_targets(path: Path) -> list[str]:
    return [t for t in links(path) if not SCHEME.match(t) and not t.startswith("#")]


def test_docs_exist():
    assert (REPO / "docs").is_dir(), "docs/ is missing"
    assert len(DOCS) > 1


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve_inside_the_repository(doc: Path):
    broken = []
    for target in relative_targets(doc):
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        resolved = (doc.parent / file_part).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{rel(doc)}: links that do not resolve to a file in the repository: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_nothing_refers_outside_the_repository(doc: Path):
    text = doc.read_text()
    hits = sorted({m.group(0) for m in OUTSIDE.finditer(text)})
    assert not hits, f"{rel(doc)} refers to paths outside the repository: {hits}"
    absolute = [t for t in links(doc) if t.startswith("/") or t.startswith("file:")]
    assert not absolute, f"{rel(doc)}: absolute link targets (use paths relative to the file): {absolute}"
    # every ../ in the text (links, or paths written out) stays inside the repository
    for m in re.finditer(r"(?:\.\./)+[\w./-]*", text):
        resolved = (doc.parent / m.group(0)).resolve()
        assert resolved.is_relative_to(REPO), f"{rel(doc)}: {m.group(0)!r} points outside the repository"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; keep it under 250 (details belong in docs/)"
    head = [ln.strip() for ln in lines[:8]]
    demo = next((i for i, ln in enumerate(head) if ln.startswith("make demo")), None)
    test = next((i for i, ln in enumerate(head) if ln.startswith("make test")), None)
    assert demo is not None and test is not None and demo < test, (
        f"README.md must start with `make demo` then `make test` in its first lines; got {head}"
    )
    targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
    assert {"demo", "test"} <= set(targets), "the Makefile lost its demo or test target"


def test_configuration_reference_is_up_to_date():
    from pipelines.config_reference import COMMAND, OUT, render

    assert OUT.is_file(), f"{rel(OUT)} is missing: run `{COMMAND}`"
    assert OUT.read_text() == render(), f"{rel(OUT)} is stale: run `{COMMAND}` and commit the result"


def test_configuration_reference_covers_every_objective():
    from pipelines.config_reference import objective_classes, render

    text = render()
    classes = objective_classes()
    assert len(classes) >= 3
    for cls in classes:
        assert f"`{cls.__module__}.{cls.__qualname__}`" in text
    for key in ("`objective.s1`", "`objective.student_steps`", "`engine.zero_stage`", "`data.shards`"):
        assert key in text


def test_configdoc_takes_explicit_objective_classes():
    from pydantic import BaseModel, Field

    from fewstep.configdoc import render

    class A(BaseModel):
        """First."""

        name: str = "a"
        x: int = Field(1, ge=0, description="An x.")

    class B(BaseModel):
        """Second."""

        name: str = "b"
        y: float | None = None

    class Root(BaseModel):
        seed: int = 0
        objective: BaseModel = Field(default_factory=A, description="one of the registry's configs")

    text = render(Root, unions={"objective": [A, B]})
    assert "`objective.x` | `int (>= 0)` | `1` | An x. |" in text
    assert "`objective.y` | `float \\| None` | `null` |" in text
    assert text.index("First.") < text.index("Second.")
