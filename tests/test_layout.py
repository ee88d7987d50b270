"""The package layout: folders map into the petal namespace and imports only point down."""

import ast
import importlib
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
