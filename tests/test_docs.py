"""README stays a short entry point, and every link in it and in docs/ leads to a file that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 9
    missing = [
        (page.name, link)
        for page in pages
        for link in re.findall(r"\]\(([^)#\s]+)\)", page.read_text())
        if not link.startswith("http") and not (page.parent / link).exists()
    ]
    assert not missing


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "tools" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_table_is_rendered_from_its_csv():
    """tools/tables.py renders each marked table from the committed CSV it reports: a figure edited by hand in the
    Markdown, or a CSV rerun without `python tools/tables.py`, fails here."""
    tables = _tables()
    assert set(tables.marked()) == set(tables.TABLES)  # every table the script knows is in a page, and only those
    assert not tables.stale()


def test_a_table_edited_by_hand_is_found_stale(tmp_path, monkeypatch):
    tables = _tables()
    page = tmp_path / "README.md"
    readme = (ROOT / "README.md").read_text()
    page.write_text(readme.replace(" | -12.69 |", " | -12.00 |"))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "PAGES", ("README.md",))
    assert tables.stale() == ["README.md: headline"]
    assert tables.main([]) == 0 and page.read_text() == readme  # rendering puts the CSV's figure back
