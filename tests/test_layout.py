"""The package layout: folders map into the petal namespace and imports only point down."""

import ast
import importlib
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "kernels", "daemon", "ctl")
LAYERS = {"protocol": set(), "kernels": {"protocol"}, "daemon": {"protocol", "kernels"}, "ctl": {"protocol", "kernels"}}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_folder_imports_as_petal_namespace(name):
    module = importlib.import_module(f"petal.{name}")
    assert Path(module.__file__).resolve().parent == ROOT / name


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down(layer):
    allowed = LAYERS[layer] | {layer}
    for path in (ROOT / layer).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                parts = n.split(".")
                if parts[0] == "petal" and len(parts) > 1:
                    assert parts[1] in allowed, f"{path.relative_to(ROOT)} imports {n}"


def test_identity_persists(tmp_path):
    from petal.daemon.identity import Identity

    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert first.peer_id == again.peer_id and first.dht_node_id == again.dht_node_id
    assert stat.S_IMODE((tmp_path / "identity.key").stat().st_mode) == 0o600
    assert Identity.generate().peer_id != first.peer_id


LAZY_OK: dict[tuple[str, str], str] = {
    ("daemon/main.py", "petal.daemon.node"): "`petald pull` and `--help` answer without importing the node's stack",
    ("daemon/api/lazy.py", "petal.daemon.api.routes"): "start-up: torch loads on first tensor/generation request",
    ("daemon/api/state.py", "petal.daemon.routing.router"): "start-up: torch loads on first tensor/generation request",
    ("daemon/api/state.py", "petal.daemon.api.frontend"): "start-up: torch loads on first tensor/generation request",
    ("daemon/node.py", "petal.daemon.serving.host"): "start-up: torch loads when the daemon first serves blocks",
    ("daemon/node.py", "petal.daemon.serving.settings"): "start-up: torch loads when the daemon first serves blocks",
    ("daemon/node.py", "petal.daemon.serving.errors"): "start-up: torch loads when the daemon first serves blocks",
}
"""The only function-level imports of the project's own modules, each with why it is not dodging a cycle."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["petal", *parts])


def _imports(path: Path, name: str) -> tuple[set[str], list[tuple[int, str]]]:
    """Project modules imported at module level (TYPE_CHECKING included), and (line, module) imported in functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        # `from pkg import mod` imports pkg.mod when that is a module of ours
        return [base] + [f"{base}.{a.name}" for a in node.names]

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in targets(child):
                    if t.startswith("petal."):
                        (nested.append((child.lineno, t)) if in_function else top.add(t))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        top, _ = _imports(path, name)
        graph[name] = {t for t in top if t in files and t != name}
    return graph


def test_no_function_level_imports_in_daemon():
    """A function-level import of a daemon module is how an import cycle hides; only LAZY_OK's reasons are allowed.

    Lazy imports of kernels (torch, transformers) stay allowed: they keep start-up fast and cannot form a cycle.
    """
    modules = set(_graph())
    found = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for line, target in _imports(path, _module_name(path))[1]:
            if target in modules and target.startswith("petal.daemon.") and (rel, target) not in LAZY_OK:
                found.append(f"{rel}:{line} imports {target} inside a function")
    assert not found, "\n".join(found)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


GRAD_MODES = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode")


def test_no_grad_mode_block_spans_an_await():
    """torch's grad mode is per thread, not per asyncio task: a ``with torch.no_grad():`` around an ``await`` lets
    concurrent tasks on the loop restore each other's modes out of order and leave autograd off for the daemon."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, (ast.With, ast.AsyncWith)):
                    continue
                if not any(m in ast.unparse(item.context_expr) for item in node.items for m in GRAD_MODES):
                    continue
                awaits = (ast.Await, ast.AsyncFor, ast.AsyncWith)
                if any(isinstance(x, awaits) for stmt in node.body for x in ast.walk(stmt)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "grad-mode blocks spanning an await:\n" + "\n".join(found)
