"""Every dotted `hyjax.` name a docstring gives (hyjax/, pallas_kernels/, bench/, launch/) names a module,
class, function or attribute that exists: a docstring that points the reader somewhere must not point
at a module a refactoring removed."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

PROJECT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("hyjax", "pallas_kernels", "bench", "launch")
DOTTED = re.compile(r"\bhyjax(?:\.[A-Za-z_]\w*)+")


def docstring_names() -> dict[str, list[str]]:
    """`{dotted name: [file:line, ...]}` of every `hyjax.x.y` in a module, class or function docstring."""
    found: dict[str, list[str]] = {}
    for folder in FOLDERS:
        for path in sorted((PROJECT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                docstring = ast.get_docstring(node, clean=False)
                if docstring is None:
                    continue
                line = node.body[0].lineno
                for name in DOTTED.findall(docstring):
                    found.setdefault(name, []).append(f"{path.relative_to(PROJECT)}:{line}")
    return found


def resolves(name: str) -> bool:
    """Whether `name` is an importable module, or an attribute path under the longest importable one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


NAMES = docstring_names()


def test_docstrings_name_hyjax_things():
    assert len(NAMES) > 50  # the scan reads the docstrings (a broken scan would pass everything below)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_a_dotted_name_in_a_docstring_resolves(name):
    assert resolves(name), f"{name} (in {', '.join(NAMES[name])}) names nothing that exists"
