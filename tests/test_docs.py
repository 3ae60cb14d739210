"""The docs stay true to the code: the README is the short page (at most 250 lines, its two commands
first), every docs page says what it is for before anything else, every link between them resolves,
and the module map of docs/how-it-works.md lists exactly the package's modules."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[:7] == ["```bash", "bash tools/demo.sh", "```", "", "```bash", "bash tools/test.sh", "```"]


def test_every_page_opens_with_what_it_is_for():
    expected = {"add-a-strategy", "check", "configuration", "deployment", "how-it-works", "library", "limits",
                "performance", "testing"}
    assert expected <= {p.stem for p in DOCS}
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "", page.name
        assert lines[2] and not lines[2].startswith(("#", "|", "```", "-", "*")), f"{page.name}: no opening paragraph"


def test_links_between_pages_resolve():
    bad = []
    for page in [REPO / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                bad.append(f"{page.name} -> {target}")
    assert bad == []


def test_module_map_lists_exactly_the_package_modules():
    text = (REPO / "docs" / "how-it-works.md").read_text()
    listed = set(re.findall(r"^\| `(fxpasses/[\w/]+\.py)` \|", text, re.M))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fxpasses").rglob("*.py")
               if "testing" not in p.relative_to(REPO / "fxpasses").parts}
    assert sorted(modules - listed) == [], "modules missing from docs/how-it-works.md's module map"
    assert sorted(listed - modules) == [], "the module map lists modules that do not exist"
