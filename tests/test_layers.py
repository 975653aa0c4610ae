"""specdec's wings form layers, and the modules inside them no cycle (counting imports inside functions).

Wings, from the bottom: `model` (a forward pass) <- `methods` (drafting and verifying) <- `engines` and `measure`
(side by side: neither imports the other) <- `run` (what runs a cell) <- `cli`. A wing imports only wings below it.
The top-level modules `strategies` and `prompts` (and the package itself) are the shared vocabulary every wing
reads: they import no wing. `db` (the store) and `dashboard` sit beside `run`: they read the vocabulary and
`measure`, and never import the engine's upper wings."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"specdec": ROOT / "specdec", "specdec.db": ROOT / "db", "specdec.dashboard": ROOT / "dashboard"}
WINGS = ["model", "methods", "engines", "measure", "run"]
# a wing's level: it may import wings of a lower level only (engines and measure share one level)
LEVEL = {"vocabulary": 0, "model": 1, "methods": 2, "engines": 3, "measure": 3, "run": 4, "db": 4, "dashboard": 5,
         "cli": 6}


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def wing_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] in (["specdec", "db"], ["specdec", "dashboard"]):
        return parts[1]
    if len(parts) > 1 and parts[1] in WINGS:
        return parts[1]
    return "cli" if module == "specdec.cli" else "vocabulary"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    packages = {m for m in known if known_is_package(m)}
    return {m for m in found if m in known and m != name and m not in packages}


def known_is_package(module: str) -> bool:
    return module in PACKAGES or module.split(".")[-1] in WINGS


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module whose wing is not below a's (within one wing: allowed)."""
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            here, there = wing_of(module), wing_of(dep)
            if here != there and LEVEL[there] >= LEVEL[here]:
                bad.append(f"{module} ({here}) -> {dep} ({there})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_find_cycle_detects_a_cycle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_upward_imports_names_an_import_that_runs_back_up():
    graph = {"specdec.model.decoding": {"specdec.run.runner", "specdec.strategies"},
             "specdec.engines.llamacpp": {"specdec.measure.metrics", "specdec.methods.proposers"},
             "specdec.run.runner": {"specdec.engines.llamacpp", "specdec.run.job"}}
    assert upward_imports(graph) == [
        "specdec.engines.llamacpp (engines) -> specdec.measure.metrics (measure)",
        "specdec.model.decoding (model) -> specdec.run.runner (run)"]


def test_every_module_lives_in_a_wing_or_is_named_at_the_top():
    top = {m for m in module_files() if m.count(".") == 1 and wing_of(m) in ("vocabulary", "cli")}
    assert top == {"specdec.cli", "specdec.strategies", "specdec.prompts"}


def test_specdec_modules_import_without_a_cycle():
    graph = import_graph()
    assert "specdec.run.runner" in graph["specdec.run.job"]  # the graph sees real imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_wings_import_only_wings_below_them():
    graph = import_graph()
    assert "specdec.model.decoding" in graph["specdec.methods.speculative"]  # sees imports across wings
    assert upward_imports(graph) == []
