"""The layering of docs/architecture.md, checked on the source: which package may import which, that no module imports
itself through others (no import circle), that no algorithm imports another (nor the PPO update unless it is one),
that algo configs share their blocks through config groups instead of repeating them, and that every user error
derives from the one base class."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "rewards", "rl", "experiments", "scripts")
# A package may import its own layer and the layers below it, never those above (experiments and scripts share the
# top layer).
LOWER = {
    "pipelines": {"pipelines"},
    "rewards": {"pipelines", "rewards"},
    "rl": {"pipelines", "rewards", "rl"},
    "experiments": set(PACKAGES),
    "scripts": set(PACKAGES),
}
ALGORITHMS = sorted(
    {target.split(".")[1] for target in re.findall(r"^_target_: (rl\.\w+)\.\w+", "\n".join(
        p.read_text() for p in (ROOT / "conf" / "algo").glob("*.yaml")), flags=re.M)}
)


def type_checking_blocks(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside `if TYPE_CHECKING:` blocks (imports for annotations only: never run)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            inside |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return inside


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports (`rl.session`, `pipelines`, ...), at any depth of the file; imports for
    annotations only (`if TYPE_CHECKING:`) are not counted."""
    found = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    annotations_only = type_checking_blocks(tree)
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("**/*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (`from rl.ppo import x` is an import of `rl.ppo`;
    `from rl import seeds` of `rl.seeds`)."""
    modules = {module_name(p): p for package in PACKAGES for p in sources(package)}

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in modules), None)

    return {module: {resolve(name) for name in project_imports(path)} - {None, module}
            for module, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (strongly connected components of
    more than one module; Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph.get(module, ())):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_algorithms_are_found():
    assert {"grpo", "ddpo", "dpo", "refl", "sft", "dreambooth", "sample"} <= set(ALGORITHMS)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_a_layer_above_it(package):
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sources(package)
        for name in project_imports(path)
        if name.split(".")[0] not in LOWER[package]
    }
    assert not upward, sorted(upward)


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_module_imports_itself_through_others():
    found = circles(import_graph())
    assert not found, f"import circles: {found}"


def test_only_the_ppo_methods_import_the_ppo_update():
    """The batching every online method shares is `rl/batching.py`; `rl/ppo.py` is PPO's (GRPO and DDPO)."""
    importers = {module for module, imported in import_graph().items() if "rl.ppo" in imported}
    assert {module for module in importers if module.startswith("rl.")} == {"rl.grpo", "rl.ddpo"}, sorted(importers)


def test_no_algorithm_imports_another():
    crossing = set()
    for algorithm in ALGORITHMS:
        for name in project_imports(ROOT / "rl" / f"{algorithm}.py"):
            module = ".".join(name.split(".")[:2])
            if module.startswith("rl.") and module.split(".")[1] in ALGORITHMS and module != f"rl.{algorithm}":
                crossing.add(f"rl/{algorithm}.py imports {module}")
    assert not crossing, sorted(crossing)


def test_shared_modules_import_no_algorithm():
    shared = [p for p in sources("rl") if p.stem not in ALGORITHMS and p.stem != "run"]
    crossing = {f"{p.relative_to(ROOT)} imports {name}" for p in shared for name in project_imports(p)
                if name.split(".")[0] == "rl" and len(name.split(".")) > 1 and name.split(".")[1] in ALGORITHMS}
    assert not crossing, sorted(crossing)


def repeated_blocks(texts: dict[str, list[str]], size: int) -> list[tuple[str, str, list[str]]]:
    """Runs of `size` identical consecutive lines (comments and blank lines included, as written) in two files."""
    windows: dict[tuple[str, ...], str] = {}
    repeats = []
    for name, lines in texts.items():
        seen_here = set()
        for i in range(len(lines) - size + 1):
            window = tuple(lines[i : i + size])
            if window in seen_here or all(not line.strip() for line in window):
                continue
            seen_here.add(window)
            if window in windows and windows[window] != name:
                repeats.append((windows[window], name, list(window)))
            windows.setdefault(window, name)
    return repeats


def test_repeated_blocks_are_found():
    block = ["a: 1", "b: 2", "c: 3", "d: 4", "e: 5"]
    assert repeated_blocks({"x": ["top", *block], "y": [*block, "end"]}, 5) == [("x", "y", block)]
    assert repeated_blocks({"x": block, "y": block[:4] + ["e: 6"]}, 5) == []


def without_defaults_list(lines: list[str]) -> list[str]:
    """A config's lines without its `defaults:` list: those lines name the shared blocks an algo pulls in (one line
    per block), which is how blocks are shared instead of repeated."""
    if "defaults:" not in lines:
        return lines
    start = lines.index("defaults:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("  - "):
        end += 1
    return lines[:start] + lines[end:]


def test_no_algo_config_repeats_a_block_of_another():
    texts = {p.name: without_defaults_list(p.read_text().splitlines())
             for p in sorted((ROOT / "conf" / "algo").glob("*.yaml"))}
    repeats = repeated_blocks(texts, 5)
    assert not repeats, "\n".join(f"{a} and {b} share:\n  " + "\n  ".join(lines) for a, b, lines in repeats[:3])


def test_every_user_error_derives_from_the_one_base_class():
    """Every exception class the project defines is a `UserError` (reported in one line, exit 2), or says why not."""
    from pipelines.errors import UserError

    defined = []
    for package in PACKAGES:
        for path in sources(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                    defined.append((module, node.name))
    assert ("pipelines.errors", "UserError") in defined
    import importlib

    for module, name in defined:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, UserError), f"{module}.{name} is not a pipelines.errors.UserError"
