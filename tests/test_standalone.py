"""The repository stands alone: a clone in any folder has every file its code, tests, benches and
Makefile read. Nothing may reach outside the clone (a `shared/` folder beside it, `..` paths,
`Path(__file__).parents[k]` above the root), and the data the tests need is tracked in git."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from tests.checkpoints import ROOT

SCANNED = ("galatea", "tests", "bench")
BESIDE = "/".join(("..", "shared"))  # the folder beside the clone (spelt so this file does not name it)


def python_files() -> list[Path]:
    return [p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]


def escapes_root(path: Path) -> list[str]:
    """Expressions in one file that climb above the repository root."""
    depth = len(path.relative_to(ROOT).parts) - 1  # parents[depth] is ROOT itself
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        text = ast.unparse(node) if isinstance(node, ast.Subscript | ast.Attribute | ast.Constant) else ""
        m = re.fullmatch(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]", text)
        if m and int(m.group(1)) > depth:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
        elif isinstance(node, ast.Attribute) and text == "ROOT.parent":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and BESIDE in node.value:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return found


def test_no_code_reads_outside_the_repository():
    found = [hit for path in python_files() for hit in escapes_root(path)]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    found += [f"Makefile: {line}" for line in makefile.splitlines() if "../" in line]
    assert not found, "reads outside the clone:\n" + "\n".join(found)


def test_the_test_data_is_tracked():
    tracked = set(subprocess.run(["git", "ls-files", "tests/data"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    for name in ("tests/data/ggml-vocab-llama-spm.gguf", "tests/data/LICENSE-llama.cpp",
                 "tests/data/sillytavern-session/seraphina.jsonl", "tests/data/sillytavern-session/README.md"):
        assert name in tracked, f"{name} is not in git: a clone would not have it"
