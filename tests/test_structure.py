"""The package's shape: no import cycle, small training modules, the public API as documented."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "glt_keras"
MAX_TRAINING_LINES = 520  # "about 500"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict:
    """module -> the glt_keras modules it imports, at any depth (lazy imports inside functions count).

    ``from X import name`` is an edge to ``X.name`` when that is a module, else to ``X``.
    """
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                while target and target not in modules:  # import a.b.c of a package-less name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_of_glt_keras_has_no_cycle():
    graph = import_graph()
    assert "glt_keras.training.run" in graph and "glt_keras.training.mixbin.search" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_training_data_flows_up_to_run_and_mixbin_run():
    graph = import_graph()
    below_run = [m for m in graph if m.startswith("glt_keras.training.") and "glt_keras.training.run" in graph[m]]
    assert sorted(below_run) == ["glt_keras.training.cli", "glt_keras.training.mixbin_run"]
    # pruning and mixbin know nothing of the fit loop
    for name, edges in graph.items():
        if name.startswith(("glt_keras.training.pruning", "glt_keras.training.mixbin.")):
            assert not edges & {"glt_keras.training.run", "glt_keras.training.mixbin_run"}, name


def test_the_library_outside_training_does_not_import_training_at_load():
    """``import glt_keras`` / ``glt_keras.zoo`` load no training code (CLI helpers may, lazily)."""
    code = ("import sys, glt_keras, glt_keras.zoo, glt_keras.recipe, glt_keras.models\n"
            "print(sorted(m for m in sys.modules if m.startswith('glt_keras.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sorted((PACKAGE / "training").rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_training_modules_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_TRAINING_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_readme_training_import_line_works():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if re.match(r"\s*from glt_keras\.training import ", line)]
    assert lines, "README shows no `from glt_keras.training import ...` line"
    code = "\n".join(lines) + "\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_public_api_resolves_and_the_package_loads_lazily():
    code = ("import sys, glt_keras.training as T\n"
            "assert 'tensorflow' not in sys.modules, 'importing glt_keras.training loaded TensorFlow'\n"
            "missing = [n for n in T.__all__ if getattr(T, n, None) is None]\n"
            "assert not missing, missing\n"
            "from glt_keras.training import run, pruning, mixbin\n"
            "assert run.train is T.train and pruning.shrink is T.shrink and mixbin.select_layers is T.select_layers\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_pruning_defaults_cover_the_recipe_schema():
    from glt_keras.recipe import PRUNING_KEYS
    from glt_keras.training.pruning import PRUNING_DEFAULTS

    assert set(PRUNING_DEFAULTS) == set(PRUNING_KEYS)
