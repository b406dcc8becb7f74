"""One concept per file: no module of the package over 400 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "respec"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def oversized(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(package.parent)
        if len(text.splitlines()) > MAX_FILE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_files_and_functions_stay_small():
    assert not oversized(), "\n".join(oversized())


def test_the_size_check_sees_a_long_function(tmp_path):
    """Negative control: a package with one 61-line function is flagged."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    assert oversized(tmp_path) == [f"{tmp_path.name}/long.py:1 long(): 61 lines"]
