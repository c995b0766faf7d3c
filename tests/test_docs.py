"""The documentation points at things that exist: the sections of docs/algorithms.md that code cites, and the modules
the README tells users to run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["rl", "pipelines", "rewards", "experiments", "scripts", "conf", "tests"]


def cited_sections(text: str) -> set[int]:
    """Section numbers cited as "docs/algorithms.md section 4", "... sections 2-3" (with or without backquotes)."""
    sections = set()
    for first, last in re.findall(r"docs/algorithms\.md`?\)?,? sections? (\d+)(?:-(\d+))?", text):
        sections.update(range(int(first), int(last or first) + 1))
    return sections


def test_cited_sections_are_parsed():
    assert cited_sections("(`docs/algorithms.md` section 4)") == {4}
    assert cited_sections("as DDPO does (`docs/algorithms.md` sections 2-3).") == {2, 3}
    assert cited_sections("(arXiv 2505.05470,\n# docs/algorithms.md section 2)") == {2}
    assert cited_sections("no citation here") == set()


def test_every_cited_section_of_the_algorithms_notes_exists():
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", (ROOT / "docs/algorithms.md").read_text(), re.M)}
    files = [ROOT / "README.md"] + [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")]
    cited = {path.relative_to(ROOT).as_posix(): cited_sections(path.read_text().replace("\n# ", " "))
             for path in files}
    assert set().union(*cited.values()), "nothing cites docs/algorithms.md"
    missing = {path: sections - headings for path, sections in cited.items() if sections - headings}
    assert not missing, f"sections cited but not in docs/algorithms.md: {missing}"


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"python -m ([\w.]+)", (ROOT / "README.md").read_text()))
    assert {"rl.run", "experiments.evaluate", "experiments.compare", "experiments.digits_results"} <= modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"the README runs modules that do not exist: {missing}"


def test_every_project_path_the_docs_name_exists():
    """`rl/session.py`, `conf/lora`, `tests/golden/` ... named in the README or docs/ are in the repository."""
    named = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:rl|pipelines|rewards|experiments|scripts|conf|docs|tests|assets)/[\w./-]*)`",
                               doc.read_text()):
            if not re.search(r"\bfoo\b|_foo\b", path):  # `rl/foo.py`: the example of adding an algorithm
                named.add(path.rstrip("/"))
    assert {"rl/session.py", "rl/checkpoints.py", "rl/seeds.py"} <= named
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"the docs name paths that do not exist: {missing}"
