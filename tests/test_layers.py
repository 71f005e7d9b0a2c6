"""The import-layer contract (ARCHITECTURE.md): a module imports only from its own layer's
package or from the layers below it, at the top of the file or inside a function alike, and the
packages that share a layer do not import each other. A future arrow that runs back up fails
here, naming the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.checkpoints import ROOT

# bottom to top; packages in one tuple share a layer and are independent of each other
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "characters"),  # characters: the bundled cards (data)
    ("files", "progress"),  # atomic writes; progress bars
    ("kernels",),
    ("model",),
    ("engine",),
    ("chat", "weights"),
    ("server", "train"),
    ("bench",),  # measurements of every layer
    ("commands",),
    ("cli",),
    ("__main__",),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def package_of(module: str) -> str | None:
    """`galatea.engine.generate` -> `engine`; None for the top package itself (its version)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "galatea" and len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `galatea` import in a file, wherever it is."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "galatea"]
            out += [(node.lineno, n) for n in names if n.startswith("galatea")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("galatea")]
    return out


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "galatea").rglob("*.py")):
        rel = path.relative_to(root)
        source = package_of(".".join(rel.with_suffix("").parts))
        if source is None or source == "__init__":  # galatea/__init__.py: the version only
            continue
        assert source in LEVEL, f"{rel}: the package {source!r} has no layer; add it to LAYERS and ARCHITECTURE.md"
        for line, module in imports(path):
            target = package_of(module)
            if target is None or target == source or target.startswith("__"):
                continue
            assert target in LEVEL, f"{rel}:{line}: imports {module}, whose package has no layer"
            if LEVEL[target] > LEVEL[source]:
                found.append(f"{rel}:{line}: {source} imports {module}, a layer above it")
            elif LEVEL[target] == LEVEL[source]:
                found.append(f"{rel}:{line}: {source} imports {module}, a package beside it")
    return found


def test_imports_follow_the_layers():
    assert violations(ROOT) == []


def test_an_upward_import_is_caught(tmp_path):
    """The contract can fail: the same check over a copy with one deliberate upward import."""
    (tmp_path / "galatea" / "model").mkdir(parents=True)
    (tmp_path / "galatea" / "chat").mkdir()
    (tmp_path / "galatea" / "model" / "bad.py").write_text(
        "def f():\n    from galatea.server.app import create_app\n    return create_app\n")
    (tmp_path / "galatea" / "chat" / "side.py").write_text("import galatea.weights.xor\n")
    assert violations(tmp_path) == [
        "galatea/chat/side.py:1: chat imports galatea.weights.xor, a package beside it",
        "galatea/model/bad.py:2: model imports galatea.server.app, a layer above it",
    ]
