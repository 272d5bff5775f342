"""House rules that a reader checks by eye, checked here so that they stay true."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpadjoint"
MAX_FUNCTION_LINES = 80


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_the_package_over_80_lines():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) > 10, f"found only {len(modules)} modules under {PACKAGE}"
    long = [f"{p.name}:{line} {name} ({n} lines)"
            for p in modules for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them along their "
                      f"seams): {', '.join(long)}")


def test_the_line_count_is_what_the_rule_reads(tmp_path):
    # the measure counts def line to last line: an 81-line function is caught, 80 is not
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    src = tmp_path / "m.py"
    src.write_text(f"def f():\n{body}\n\n\ndef g():\n{body}\n    x = 0\n")
    assert [(name, n) for name, _, n in _functions(src)] == [("f", 80), ("g", 81)]
