"""The documentation points at things that exist and covers what a run logs: the sections of docs/algorithms.md that
code cites, the modules the README and the docs pages tell users to run, the paths they name, every page in the docs
site's nav, and every metric key the CPU presets log documented in docs/metrics.md."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["rl", "pipelines", "rewards", "experiments", "scripts", "conf", "tests"]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", *PAGES]  # what a user reads: the front door and the docs site
README_MAX_LINES = 250  # the README is the front door; the manual is the docs site


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
    assert cited_sections("[docs/algorithms.md section 8](algorithms.md#8-grpo-guard-arxiv-251022319)") == {8}
    assert cited_sections("no citation here") == set()


def test_every_cited_section_of_the_algorithms_notes_exists():
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", (ROOT / "docs/algorithms.md").read_text(), re.M)}
    files = DOCS + [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")]
    cited = {path.relative_to(ROOT).as_posix(): cited_sections(path.read_text().replace("\n# ", " "))
             for path in files}
    assert set().union(*cited.values()), "nothing cites docs/algorithms.md"
    assert set().union(*(cited[p.relative_to(ROOT).as_posix()] for p in PAGES)), "no docs page cites its math"
    missing = {path: sections - headings for path, sections in cited.items() if sections - headings}
    assert not missing, f"sections cited but not in docs/algorithms.md: {missing}"


def test_every_module_the_docs_run_exists():
    """`python -m <module>` in the README or any docs page names a module that exists."""
    modules = set().union(*(re.findall(r"python -m ([\w.]+)", doc.read_text()) for doc in DOCS))
    assert {"rl.run", "experiments.evaluate", "experiments.compare", "experiments.digits_results"} <= modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"the README or the docs run modules that do not exist: {missing}"


def test_every_project_path_the_docs_name_exists():
    """`rl/session.py`, `conf/lora`, `tests/golden/` ... named in the README or docs/ are in the repository."""
    named = set()
    for doc in DOCS:
        for path in re.findall(r"`((?:rl|pipelines|rewards|experiments|scripts|conf|docs|tests|assets)/[\w./-]*)`",
                               doc.read_text()):
            if not re.search(r"\bfoo\b|_foo\b", path):  # `rl/foo.py`: the example of adding an algorithm
                named.add(path.rstrip("/"))
    assert {"rl/session.py", "rl/checkpoints.py", "rl/seeds.py"} <= named
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"the docs name paths that do not exist: {missing}"


def nav_pages(entry) -> list[str]:
    """The page files of an mkdocs `nav` (nested lists of `{title: page or list}`)."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, list):
        return [page for item in entry for page in nav_pages(item)]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {entry!r}")


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), f"pages listed twice in mkdocs.yml's nav: {listed}"
    pages = {p.name for p in PAGES}
    assert {"index.md", "metrics.md", "algorithms.md", "architecture.md", "comparison.md"} <= pages
    assert not pages - set(listed), f"docs pages missing from mkdocs.yml's nav: {sorted(pages - set(listed))}"
    assert not set(listed) - pages, f"mkdocs.yml's nav lists pages that do not exist: {sorted(set(listed) - pages)}"


def test_ci_builds_the_docs_strictly_and_the_readme_stays_short():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^(?:\w+=\S* )*mkdocs build --strict\b", ci, re.M), "CI does not build the docs strictly"
    assert "site/" in (ROOT / ".gitignore").read_text().splitlines(), "the built site is not ignored"
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference text to a docs page"


# docs/metrics.md documents keys in the first column of its tables. A key is documented when it equals one of those
# (backquoted) keys, or matches one whose placeholders stand for: <g> a guidance scale as %g writes it; <task> a
# GenEval task name; <component> a reward option (conf/reward/*.yaml); <info> a name in the first column of the
# "Reward values" table (itself possibly with <task> or <component>); <eval> the rest of a documented `eval/` key.
METRICS = ROOT / "docs" / "metrics.md"


def documented_keys(text: str) -> dict[str, list[str]]:
    """The backquoted entries of each table's first column (header rows left out), by the section they are under."""
    sections: dict[str, list[str]] = {}
    section = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:].strip()
        is_header = i + 1 < len(lines) and re.match(r"^\|\s*-{3}", lines[i + 1])
        if line.startswith("|") and not re.match(r"^\|\s*-{3}", line) and not is_header:
            first_cell = line.split("|")[1]
            sections.setdefault(section, []).extend(re.findall(r"`([^`]+)`", first_cell))
    return sections


def alternation(patterns: list[str]) -> str:
    return "(?:" + "|".join(patterns) + ")"


def key_matcher(text: str):
    """A predicate: whether a metric key is documented in `text` (docs/metrics.md), by the rule above."""
    sections = documented_keys(text)
    components = sorted(p.stem for p in (ROOT / "conf" / "reward").glob("*.yaml"))
    fixed = {"<g>": r"\d+(?:\.\d+)?", "<task>": r"[a-z]+(?:_[a-z]+)*", "<component>": alternation(components)}

    def pattern(entry: str, placeholders: dict[str, str]) -> str:
        out = re.escape(entry)
        for name, regex in placeholders.items():
            out = out.replace(re.escape(name), regex)
        assert "<" not in out, f"docs/metrics.md: a placeholder the test does not know in {entry!r}"
        return out

    info_names = sections.pop("Reward values")
    basic = [pattern(n, fixed) for n in info_names if "<info>" not in n]
    info = alternation(basic + [pattern(n, {**fixed, "<info>": alternation(basic)})
                                for n in info_names if "<info>" in n])
    keys = [k for entries in sections.values() for k in entries]
    evals = [pattern(k[len("eval/"):], {**fixed, "<info>": info}) for k in keys if k.startswith("eval/")]
    placeholders = {**fixed, "<info>": info, "<eval>": alternation(evals)}
    documented = re.compile(alternation([pattern(k, placeholders) for k in keys]))
    return lambda key: documented.fullmatch(key) is not None


def logged_keys() -> dict[str, set[str]]:
    """Every key the CPU presets log, by preset: their golden records, and the wall-clock keys those leave out."""
    presets_test = (ROOT / "tests" / "test_presets.py").read_text()
    wall_clock = set(re.findall(r'"([\w/]+)"', re.search(r"^WALL_CLOCK = \{([^}]*)\}", presets_test, re.M).group(1)))
    assert "train/seconds" in wall_clock
    keys = {}
    for golden in sorted((ROOT / "tests" / "golden").glob("*.json")):
        record = json.loads(golden.read_text())
        keys[record["preset"]] = {key for r in record["records"] for key in r}
    keys["(wall-clock keys, not recorded)"] = wall_clock
    return keys


def test_the_metrics_matcher_is_strict():
    documented = key_matcher(METRICS.read_text())
    for key in ["step", "train/loss", "train/correct_mean", "eval/correct_std", "eval/correct_counting_mean",
                "eval_guidance_1/correct_mean", "eval_guidance_4.5/reward_std", "eval_seconds/reward_mean",
                "eval_seconds/mark", "train/aesthetic_mean", "eval/clip_score/cosine_mean", "sample/num_images"]:
        assert documented(key), key
    for key in ["train/made_up", "train/made_up_mean", "eval/made_up_mean", "train/correct_std", "eval/loss_mean",
                "eval_guidance_x/reward_mean", "eval_guidance_1/made_up", "train/not_a_reward/cosine_mean",
                "eval_seconds/made_up", "final/loss", "train/loss/extra"]:
        assert not documented(key), key


def test_every_key_the_cpu_presets_log_is_documented():
    documented = key_matcher(METRICS.read_text())
    keys = logged_keys()
    assert len(keys) > 10 and {"train/approx_kl", "eval/correct_mean"} <= set().union(*keys.values())
    missing = {preset: sorted(k for k in found if not documented(k)) for preset, found in keys.items()}
    missing = {preset: found for preset, found in missing.items() if found}
    assert not missing, f"keys the CPU presets log that docs/metrics.md does not document: {missing}"
