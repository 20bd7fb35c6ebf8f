"""Files a reader can hold: no module over ~500 lines, no function over 100 lines.

Counted with :mod:`ast`: a function's length is its body from the first statement after the
docstring to the last one (the signature and the docstring are documentation, not code to hold in
one's head). Long functions may be allowed only as linear code that splitting would fragment,
each named with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "maskdiff"
MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 100

# "module:function" -> why it may stay long.
# Empty now; a linear plotting or reader function may be added here with its reason.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def function_lengths(path: Path) -> dict[str, int]:
    """Lines of code per function in ``path``: from the first statement after the docstring."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            out[node.name] = max(out.get(node.name, 0), node.end_lineno - body[0].lineno + 1)
    return out


def size_table() -> dict[str, object]:
    """Figures quoted in the changelog: largest module, modules over the limit, longest function."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in modules()}
    longest = max(((f"{m}:{name}", n) for m in sizes for name, n in function_lengths(PACKAGE / m).items()),
                  key=lambda kv: kv[1])
    largest = max(sizes.items(), key=lambda kv: kv[1])
    return {"modules": len(sizes), "largest": largest, "over_500": sum(n > 500 for n in sizes.values()),
            "longest_function": longest}


def test_no_module_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_too_long():
    long = {key: n for p in modules() for name, n in function_lengths(p).items()
            if n > MAX_FUNCTION_LINES and (key := f"{p.relative_to(PACKAGE)}:{name}") not in LONG_FUNCTIONS_ALLOWED}
    assert long == {}


def test_the_counter_counts():
    lengths = function_lengths(Path(__file__))
    assert lengths["test_the_counter_counts"] == 3  # three lines of code, no docstring
    assert lengths["function_lengths"] == 9  # its one-line docstring is not counted


if __name__ == "__main__":
    print(size_table())
