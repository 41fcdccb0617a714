"""README stays a short entry point, and every link in it and in docs/ leads to a file that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_a_front_page():
    """At most 150 lines, the two commands within the first 60, one figure (drawn from its CSVs by tools/figures.py)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150 and lines.index("## Set up and run") < 60
    figures = [m for line in lines for m in re.findall(r"!\[[^]]*\]\(([^)]+)\)", line)]
    assert len(figures) == 1 and (ROOT / figures[0]).is_file() and figures[0].startswith("docs/figures/")


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


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_table_is_rendered_from_its_csv():
    """tools/tables.py renders each marked table from the committed CSV it reports: a figure edited by hand in the
    Markdown, or a CSV rerun without `python tools/tables.py`, fails here."""
    tables = _tool("tables")
    assert set(tables.marked()) == set(tables.TABLES)  # every table the script knows is in a page, and only those
    assert not tables.stale()


def test_a_table_edited_by_hand_is_found_stale(tmp_path, monkeypatch):
    tables = _tool("tables")
    page = tmp_path / "README.md"
    readme = (ROOT / "README.md").read_text()
    page.write_text(readme.replace(" | -12.69 |", " | -12.00 |"))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "PAGES", ("README.md",))
    assert tables.stale() == ["README.md: headline"]
    assert tables.main([]) == 0 and page.read_text() == readme  # rendering puts the CSV's figure back


def test_every_figure_draws_from_its_committed_csvs(tmp_path, monkeypatch):
    """tools/figures.py finds each figure's rows in the committed CSVs and writes a PNG per figure (README's among them)."""
    figures = _tool("figures")
    monkeypatch.setattr(figures, "OUT", tmp_path)
    assert figures.main([]) == 0
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == sorted(f"{name}.png" for name in figures.FIGURES) and "fusion-methods.png" in drawn
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in tmp_path.glob("*.png"))


def _readme_commands() -> list[list[str]]:
    """Every command line in README's code blocks (indented four spaces), comments and `[...]`/`...` placeholders dropped."""
    import shlex

    out = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("    ") or line.strip().startswith(("from ", "groups", "result")):
            continue
        words = [w for w in shlex.split(line.split("  #")[0], comments=False) if w not in ("...",) and not w.startswith("[")]
        words = [w for w in words if not w.endswith("]") and "=" not in w.split("/")[0] or w.startswith("--")]
        if words:
            out.append(words)
    return out


def test_every_command_in_readme_parses_or_exists():
    """README's commands are real: each otfuse and fusion-script line parses with that command's own parser (every
    option it names exists), and each script it runs is in the repository and executable."""
    import os

    from otfuse.cli import build_parser
    from otfuse.sweep import parser as sweep_parser

    commands = _readme_commands()
    assert len(commands) >= 20
    for words in commands:
        if words[0] == "otfuse":
            build_parser().parse_args(words[1:])
        elif words[0] == "python" and words[1].startswith("run_"):
            sweep_parser("activation").parse_args(words[2:])
        elif words[0] == "python":
            assert (ROOT / words[1]).is_file(), words
        elif words[0] == "source":
            assert (ROOT / words[1]).is_file(), words
        else:
            assert (ROOT / words[0]).is_file() and os.access(ROOT / words[0], os.X_OK), words


def test_setup_venv_can_be_sourced_without_changing_the_shell_s_options():
    """README says `source tools/setup_venv.sh`: it must put .venv/bin on PATH and leave the user's shell as it was
    (its `set -euo pipefail` used to stay, so a later failing command closed the user's terminal)."""
    import subprocess

    script = 'set +euo pipefail; source tools/setup_venv.sh; echo "opts=$-"; set -o | grep pipefail; command -v python'
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    opts, pipefail, python = run.stdout.split("\n")[:3]
    assert "e" not in opts.removeprefix("opts=") and "u" not in opts.removeprefix("opts=") and pipefail.split() == ["pipefail", "off"]
    assert python == str(ROOT / ".venv" / "bin" / "python")
