"""The package reads top-down: no import cycles, the library never imports the command line, and no
function imports another otfuse module except where docs/library.md says why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import otfuse

PACKAGE = Path(otfuse.__file__).parent
COMMAND_LINE = {"otfuse.cli", "otfuse.entry", "otfuse.__main__"}
# (module, imported module): function-level imports docs/library.md explains (the entry point's Ctrl-C guard)
ALLOWED_INNER = {("otfuse.entry", "otfuse.cli"), ("otfuse.federated", "otfuse.fusion"), ("otfuse.federated", "otfuse.inputs")} | {
    ("otfuse.cli", m)
    for m in (
        "otfuse.align",
        "otfuse.budget",
        "otfuse.federated",
        "otfuse.fusion",
        "otfuse.inputs",
        "otfuse.interpolate",
        "otfuse.partial",
        "otfuse.plots",
        "otfuse.report",
        "otfuse.tune",
    )
}


def _modules() -> dict[str, ast.Module]:
    """Every module of the package and its subpackages (`otfuse.align.weights`; a package by its own name)."""

    def name(p: Path) -> str:
        parts = ("otfuse",) + p.relative_to(PACKAGE).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    return {name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("otfuse")]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("otfuse"):
        if node.module == "otfuse":  # `from otfuse import cli`: the names are modules
            return [f"otfuse.{a.name}" for a in node.names]
        return [node.module]
    return []


def _graph() -> dict[str, set[str]]:
    """module -> otfuse modules it imports at module level."""
    return {name: {m for node in tree.body for m in _imported(node)} for name, tree in _modules().items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one where there is one
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_library_never_imports_the_command_line():
    for module, imports in _graph().items():
        if module not in COMMAND_LINE:
            assert not imports & COMMAND_LINE, f"{module} imports {imports & COMMAND_LINE}"


def test_no_function_imports_another_otfuse_module_except_where_the_docs_say_why():
    inner = set()
    for name, tree in _modules().items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                inner |= {(name, m) for m in _imported(node)}
    assert inner == ALLOWED_INNER
    library = (PACKAGE.parents[1] / "docs" / "library.md").read_text()  # the package page says why each one is there
    sentences = " ".join(library.split()).split(". ")
    for module, imported in ALLOWED_INNER:
        assert any(f"`{module}` imports " in s and f"`{imported}`" in s and " inside " in s for s in sentences), (module, imported)


def test_no_module_imports_another_modules_underscored_names():
    private = [
        (name, node.module, a.name)
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("otfuse")
        for a in node.names
        if a.name.startswith("_") and a.name != "__version__"
    ]
    assert not private


def test_training_and_checkpoints_load_no_grouping_or_transport_library():
    """Training, evaluation and checkpoint loading need neither Torch-Pruning nor POT nor scipy (the refit's): a
    constant of the refit once pulled them all into `otfuse.checkpoints`; nor do their commands."""
    import subprocess
    import sys

    heavy = "('torch_pruning', 'ot', 'scipy', 'timm', 'optuna', 'matplotlib', 'otfuse.refit', 'otfuse.maps')"
    code = "import sys, otfuse.train, otfuse.evaluate, otfuse.checkpoints; "
    # the command line too: `otfuse train` and `otfuse evaluate` build only their own options
    code += "from otfuse.cli import build_parser; build_parser('train'); build_parser('evaluate'); build_parser('finetune'); "
    code += f"print(sorted(m for m in {heavy} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def _top_imports() -> dict[str, set[str]]:
    """top-level module or package (`align`) -> the top-level otfuse modules it imports at module level."""
    out: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        parts = name.split(".")
        if len(parts) > 1:
            out.setdefault(parts[1], set()).update(d.split(".")[1] for d in deps if d.count(".") >= 1 and d.split(".")[1] != parts[1])
    return out


def test_the_module_order_in_readme_and_library_md_is_the_import_order():
    """README and docs/library.md list the modules top-down: none may import one listed below it (they drifted)."""
    root = PACKAGE.parents[1]
    imports = _top_imports()
    table = "\n".join(line.split(" | ")[0] for line in (root / "docs" / "library.md").read_text().splitlines() if line.startswith("| `"))
    readme = (root / "README.md").read_text().split("is one module per concept")[1].split("live in registries")[0]
    for where, text in (("docs/library.md", table), ("README.md", readme)):
        order = [m for m in re.findall(r"`(\w+)/?`", text) if m in imports]
        pos = {m: i for i, m in enumerate(order)}
        late = [f"{m} imports {d}" for m in order for d in sorted(imports[m]) if d in pos and pos[d] > pos[m]]
        assert len(order) >= 25 and not late, f"{where} lists a module above one it imports: {late}"


def test_torch_pruning_and_private_autograd_attributes_are_read_in_the_adapter_only():
    """One module to diff against a new Torch-Pruning or torch release; no file of the grouping package over 500 lines."""
    readers = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if re.search(r"torch_pruning|_saved_|_input_metadata", p.read_text())
    )
    assert readers == ["grouping/adapter.py"], readers
    long = {p.name: n for p in (PACKAGE / "grouping").glob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
