"""Page scripts: Streamlit's "magic" writes any bare string literal of a page onto the page, so
a page has none besides its module docstring (which Streamlit does not show)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([ROOT / "app.py", *(ROOT / "pages").glob("*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_bare_string_would_be_drawn(script: Path) -> None:
    body = ast.parse(script.read_text()).body
    bare = [node.lineno for node in body[1:] if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    assert not bare, f"{script.name}: bare strings at lines {bare} would be shown on the page"
