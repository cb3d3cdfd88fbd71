"""The import rule of docs/architecture.md: no imports inside functions but optional or heavy ones
(dask, fsspec, torch, the slide backends, matplotlib's backend choice), each with a one-line reason
as a comment on its line."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cytosyn_data", "cytosyn_model", "cytosyn_encoders")


def function_imports() -> list[tuple[str, int, str]]:
    """(file, line, text) of every import statement inside a function of the three packages."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = path.read_text().splitlines()
            for fn in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found += [(str(path.relative_to(ROOT)), n.lineno, lines[n.lineno - 1])
                              for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_every_import_inside_a_function_gives_its_reason():
    found = function_imports()
    unexplained = [f"{f}:{n}: {text.strip()}" for f, n, text in found if "#" not in text]
    assert not unexplained, "imports inside functions without a reason:\n" + "\n".join(unexplained)
    assert len(found) <= 24, f"{len(found)} imports inside functions; lift them or say why here"
