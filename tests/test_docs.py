"""The documents stand on their own: every page, section and link they or the code cite exists.

Checked over the repository's tracked text files (issue 13):
- nothing cites the design notes that lived outside the repository;
- every `docs/NAME.md` named anywhere exists, and so does its `#anchor`;
- every relative link in README.md and docs/*.md resolves, to a file and to a heading;
- every section cited by name (`docs/PAGER.md, "Graph pool"`, `POLICY.md ("Score")`) is a
  heading of that page.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".proto", ".toml", ".sh", ".yaml", ".yml", ".service", ".ini"}
TEXT_NAMES = {"Makefile", "Dockerfile"}
SKIP = ("bench/results/", "build/", ".venv/")  # logs of past runs quote the text of their day
DESIGN_NOTES = "DESIGN" + ".md"  # spelled apart, or this file would cite it

# `docs/NAME.md` with an optional `#anchor`.
DOC_PATH = re.compile(r"docs/([A-Za-z_]+\.md)(#[\w-]+)?")
# A markdown link `[text](target)`.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A page cited with a section name on the same line: `docs/X.md, "S"`, `X.md ("S")`.
SECTION = re.compile(r"\b(?:docs/)?([A-Z][A-Z_]*\.md)(?:,\s*|\s*\(\s*)\"([^\"]+)\"")


def tracked_files() -> list[Path]:
    """The repository's text files: git's list in a checkout, else the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    files = []
    for name in names:
        path = ROOT / name
        # This file names example pages in its patterns and docstring.
        if name.startswith(SKIP) or path == Path(__file__) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            files.append(path)
    return files


def lines_of(paths: list[Path]) -> Iterator[tuple[Path, int, str]]:
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            yield path, number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def headings(page: Path) -> tuple[tuple[str, ...], frozenset[str]]:
    """A page's heading texts, and their anchors (GitHub numbers repeats: x, x-1, x-2)."""
    texts: list[str] = []
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        texts.append(match.group(1))
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return tuple(texts), frozenset(anchors)


def anchor_problem(page: Path, anchor: str) -> str | None:
    if not page.is_file():
        return f"{page.relative_to(ROOT)} does not exist"
    if anchor and anchor not in headings(page)[1]:
        return f"{page.relative_to(ROOT)} has no heading #{anchor}"
    return None


def where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_the_documents_are_found() -> None:
    # Guards the checks below against passing on an empty list.
    files = tracked_files()
    assert ROOT / "README.md" in files
    assert DOCS / "ARCHITECTURE.md" in files
    assert any(p.suffix == ".py" for p in files)


def test_nothing_cites_design_notes_outside_the_repository() -> None:
    found = [
        where(path, number)
        for path, number, line in lines_of(tracked_files())
        if DESIGN_NOTES in line
    ]
    assert not found, f"{DESIGN_NOTES} is not in the repository; cite docs/ instead: {found}"


def test_every_cited_docs_page_and_anchor_exists() -> None:
    problems = []
    for path, number, line in lines_of(tracked_files()):
        for match in DOC_PATH.finditer(line):
            problem = anchor_problem(DOCS / match.group(1), (match.group(2) or "#")[1:])
            if problem:
                problems.append(f"{where(path, number)}: {problem}")
    assert not problems, problems


def test_relative_links_in_the_documents_resolve() -> None:
    problems = []
    for path, number, line in lines_of(doc_pages()):
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            page = (path.parent / file_part).resolve() if file_part else path
            if not page.exists():
                problems.append(f"{where(path, number)}: {target} does not exist")
            elif page.suffix == ".md":
                problem = anchor_problem(page, anchor)
                if problem:
                    problems.append(f"{where(path, number)}: {problem}")
    assert not problems, problems


def test_sections_cited_by_name_exist() -> None:
    problems = []
    for path, number, line in lines_of(tracked_files()):
        for match in SECTION.finditer(line):
            page = DOCS / match.group(1)
            if not page.is_file():
                page = ROOT / match.group(1)
            if not page.is_file() or page.parent not in (DOCS, ROOT):
                continue  # another page's own name (STYLE.md): not a page of this repository
            cited = match.group(2).lower()
            if not any(text.lower().startswith(cited) for text in headings(page)[0]):
                problems.append(f"{where(path, number)}: {page.name} has no section {cited!r}")
    assert not problems, problems


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Pager (issue 3)", "pager-issue-3"),
        ("Measured on the development VM", "measured-on-the-development-vm"),
        ("The paged runtime (`runtime.py`)", "the-paged-runtime-runtimepy"),
        ("Faults (tests/faults.py, f.py)", "faults-testsfaultspy-fpy"),
    ],
)
def test_anchors_are_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
