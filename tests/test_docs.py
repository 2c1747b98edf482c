"""The repository documents itself: every relative link in README.md, CONTRIBUTING.md and
docs/*.md resolves to a file (or folder) inside the repository."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
# [text](target) and ![alt](target); a target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def relative_links(text: str) -> list[str]:
    """Link targets outside code blocks that are not URLs or same-page anchors."""
    text = FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and anchors on the same page
        targets.append(target)
    return targets


def test_the_link_parser_finds_links_and_skips_code_and_urls() -> None:
    text = ("see [a](docs/a.md) and ![img](images/x.png \"t\") and [web](https://x.org) [here](#top)\n"
            "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n[b](../c.md#part)")
    assert relative_links(text) == ["docs/a.md", "images/x.png", "../c.md#part"]


def test_documents_exist() -> None:
    assert (ROOT / "README.md").is_file() and (ROOT / "CONTRIBUTING.md").is_file()
    assert (ROOT / "docs" / "architecture.md").is_file()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document: Path) -> None:
    broken = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path = unquote(target.split("#", 1)[0])
        resolved = (document.parent / path).resolve()
        if ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{document.relative_to(ROOT)}: broken links: {', '.join(broken)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_mention_of_files_outside_the_repository(document: Path) -> None:
    # Plain-text mentions too: a reader of a clone cannot open ../shared/... either.
    assert "../shared" not in document.read_text(encoding="utf-8")
