"""Shared test code lives in tests/helpers.py (and fixtures in conftest.py files): no test module imports
another test module or a conftest (ast over every file under tests/)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    package = ".".join(path.relative_to(TESTS.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_no_test_module_imports_another_or_a_conftest():
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, module in _imported_modules(path):
            last = module.rsplit(".", 1)[-1]
            if module.startswith("tests") and (last.startswith("test_") or last == "conftest"):
                bad.append(f"{path.relative_to(TESTS.parent)}:{line} imports {module}")
    assert not bad, "import shared test code from tests.helpers instead:\n" + "\n".join(bad)
