#!/usr/bin/env bash
# Non-blocking check (not part of CI): install the newest versions that pyproject.toml's bounds allow into a fresh
# virtual environment, say which packages moved away from constraints.txt and which upper bounds hold a newer release
# back, and run the test suite there, to see breakage before users do.
#
#   bash scripts/check_latest_deps.sh                      # report only
#   bash scripts/check_latest_deps.sh --write-constraints  # ... and, if the suite passes, re-pin constraints.txt
#   bash scripts/check_latest_deps.sh -- -m slow           # arguments after -- go to pytest
#
# Exit code: 0 when the suite passes with the newest allowed versions, 1 when it fails, 2 when the install fails.
set -uo pipefail
cd "$(dirname "$0")/.."

write=false
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --write-constraints) write=true ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "usage: bash scripts/check_latest_deps.sh [--write-constraints] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
    shift
done

work=$(mktemp -d)
venv="$work/venv"
python3 -m venv "$venv" && source "$venv/bin/activate" || { echo "latest-deps: no virtual environment"; exit 2; }
echo "latest-deps: $(python --version), fresh environment in $venv"
if ! pip install --quiet --progress-bar off -e ".[dev]" > "$work/install.log" 2>&1; then
    echo "latest-deps: install FAILED with the newest allowed versions:"; tail -20 "$work/install.log"; exit 2
fi
pip freeze --all --exclude-editable | grep -v -e "^-e " -e "^pip==" | sort > "$work/latest.txt"

echo "latest-deps: versions that differ from constraints.txt (pinned -> newest allowed):"
python - "$work/latest.txt" <<'PY'
import re
import sys

def pins(path):
    out = {}
    try:
        lines = open(path).readlines()
    except FileNotFoundError:  # no constraints.txt yet: everything counts as moved
        lines = []
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out

pinned, latest = pins("constraints.txt"), pins(sys.argv[1])
moved = [(n, pinned.get(n, "(not pinned)"), v) for n, v in sorted(latest.items()) if pinned.get(n) != v]
for name, old, new in moved:
    print(f"  {name:<32} {old:>14} -> {new}")
print(f"  ({len(moved)} of {len(latest)} packages)" if moved else "  none")
PY

echo "latest-deps: upper bounds in pyproject.toml and the newest release of each:"
python - <<'PY'
import re
import subprocess
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
for requirement in requirements:
    if "<" not in requirement:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    out = subprocess.run(["pip", "index", "versions", name], capture_output=True, text=True).stdout
    newest = out.split("(")[1].split(")")[0] if "(" in out else "unknown"
    print(f"  {requirement:<32} newest release: {newest}")
PY

if $write; then
    # The suite reads constraints.txt too (tests/test_install.py), so the new pins are in place while it runs; the old
    # file comes back if it fails.
    cp constraints.txt "$work/constraints.old" 2>/dev/null || : > "$work/constraints.old"
    {
        echo "# The exact versions the test suite passed with (Python $(python -c 'import sys; print(*sys.version_info[:2], sep=".")'), $(uname -m) Linux), written by"
        echo "# \`bash scripts/check_latest_deps.sh --write-constraints\` on $(date -u +%Y-%m-%d). Install with"
        echo "# \`pip install -e \".[dev]\" -c constraints.txt\`; CI (.ci/run) does."
        cat "$work/latest.txt"
    } > constraints.txt
fi

echo "latest-deps: running the test suite"
pytest "${pytest_args[@]}"
status=$?
if [ "$status" -eq 0 ]; then
    echo "latest-deps: PASSED with the newest allowed versions"
    $write && echo "latest-deps: wrote constraints.txt"
    exit 0
fi
echo "latest-deps: FAILED (pytest exit $status) with the newest allowed versions"
if $write; then
    if [ -s "$work/constraints.old" ]; then cp "$work/constraints.old" constraints.txt; else rm -f constraints.txt; fi
    echo "latest-deps: constraints.txt is unchanged"
fi
exit 1
