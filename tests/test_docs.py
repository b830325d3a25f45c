"""The README and docs/ pages: every relative link and anchor resolves, and the README stays short.

Links are checked the way GitHub renders them: a relative link names a file or folder relative to the linking page,
and an anchor (`#section`, `page.md#section`) must be the GitHub slug of a heading in the target page. Text inside
code blocks and inline code is not Markdown, so neither its `#` lines nor its brackets count.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 16_000

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation other than `-` and `_` dropped,
    spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML shows nothing of its tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug in `page`, repeated headings numbered -1, -2... as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """The link targets in `page`'s prose (inline code and code blocks left out)."""
    return [target for line in prose_lines(page.read_text(encoding="utf-8"))
            for target in LINK.findall(INLINE_CODE.sub("", line))]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http(s), mailto...: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_slug_follows_github() -> None:
    assert slug("Quick start (a fresh machine, two commands)") == "quick-start-a-fresh-machine-two-commands"
    assert slug("StatefulLoader or torchdata's StatefulDataLoader") == "statefulloader-or-torchdatas-statefuldataloader"
    assert slug("`plan.json`") == "planjson"
    assert slug("inputs/part-NNNN.jsonl and .keys.npy") == "inputspart-nnnnjsonl-and-keysnpy"
    assert slug("snake_case and -hyphens-") == "snake_case-and--hyphens-"


def test_repeated_headings_are_numbered(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# A\n## Notes\n```bash\n# Notes\n```\n## Notes\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"a", "notes", "notes-1", "notes-2"}


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n## Here\n", encoding="utf-8")
    page = tmp_path / "docs" / "a.md"
    page.write_text("# A\n[ok](b.md#here) [self](#a) [web](https://example.com/x.md#nowhere) `[code](gone.md)`\n"
                    "[gone](c.md) [bad anchor](b.md#there) [bad self](#nowhere)\n", encoding="utf-8")
    assert broken_links(page) == [
        f"c.md: {tmp_path / 'docs' / 'c.md'} does not exist",
        "b.md#there: no heading with anchor #there in b.md",
        "#nowhere: no heading with anchor #nowhere in a.md",
    ]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into a docs/ page"
