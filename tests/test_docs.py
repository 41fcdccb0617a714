"""README stays a short entry point, and every link in it and in docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 9
    missing = [(page.name, link) for page in pages for link in re.findall(r"\]\(([^)#\s]+)\)", page.read_text())
               if not link.startswith("http") and not (page.parent / link).exists()]
    assert not missing
