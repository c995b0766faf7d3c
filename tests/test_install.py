"""The install is reproducible: constraints.txt pins every dependency within pyproject.toml's bounds, CI installs with
it and runs the README's own commands."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands")[1].split("```bash")[1].split("```")[0]
    return [line.split("#")[0].strip() for line in section.strip().splitlines()]


def test_constraints_pin_every_dependency_within_the_bounds():
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, outside pyproject.toml's {requirement}")


def test_ci_runs_the_readmes_commands_with_the_constraints():
    install, run_default = readme_commands()[0].split(" && ")
    install_dev, test = readme_commands()[1].split(" && ")
    assert install == 'pip install -e . -c constraints.txt' and run_default == "python -m rl.run"
    assert install_dev == 'pip install -e ".[dev]" -c constraints.txt' and test == "pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^pip install [^\n]*-e "\.\[dev\]" -c constraints\.txt', ci, re.M), "CI installs otherwise"
    assert re.search(r"^python3 -m venv ", ci, re.M), "CI does not build a fresh virtual environment"
    assert re.search(r"^pytest$", ci, re.M), "CI runs another test command than the README's"



def test_the_wheel_holds_the_code_and_no_study_outputs(tmp_path):
    """`pip wheel .` packages the five code packages and none of the committed run outputs (`results/`) or tests.
    Built from a copy of the files git knows (a clean checkout's), so that no earlier build's leftovers count."""
    import shutil
    import subprocess
    import sys
    import zipfile

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    source = tmp_path / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--quiet", "-w", str(tmp_path)],
                   cwd=source, check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("sd3_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if "/" in name and ".dist-info/" not in name}
    assert tops == {"rl", "rewards", "pipelines", "experiments", "scripts"}, tops
    assert "rl/run.py" in names and "experiments/method_comparison.py" in names
    assert not [name for name in names if name.endswith(("metrics.jsonl", ".png")) or "results/" in name]
