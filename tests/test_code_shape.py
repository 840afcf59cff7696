"""Code shape (issue: code shape), read from the source with `ast` (nothing is imported):
every public function and class in htpo_jax/, and every public method of a public class, has a
docstring, so a reader learns what a name is without reading its body; and no function in the
rollout engine or in compile_programs is over 80 lines, so each stays readable as one piece.
A failure lists each offender as `path:name`."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "htpo_jax"
SHORT_FUNCTION_FILES = ("rollout/engine.py", "tools/compile_programs.py")
MAX_FUNCTION_LINES = 80

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def undocumented(path: Path, root: Path) -> list[str]:
    """`rel/path.py:name` (`:Class.method` for methods) of each public top-level function or
    class, and each public method (properties included) of a public class, without a docstring.
    Names starting with `_` (dunders included) are exempt."""
    rel = path.relative_to(root).as_posix()
    out = []
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if not isinstance(node, _DEFS) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None:
            out.append(f"{rel}:{node.name}")
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, _FUNCS) and not m.name.startswith("_"):
                    if ast.get_docstring(m) is None:
                        out.append(f"{rel}:{node.name}.{m.name}")
    return out


def long_functions(path: Path, root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`rel/path.py:name (N lines)` of each function, at any nesting level, over `limit` lines."""
    rel = path.relative_to(root).as_posix()
    return [
        f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, _FUNCS) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_every_public_name_has_a_docstring():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"expected the package's modules under {PACKAGE}"
    missing = [name for f in files for name in undocumented(f, PACKAGE)]
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


def test_no_long_functions_in_engine_and_compile_programs():
    long = []
    for rel in SHORT_FUNCTION_FILES:
        path = PACKAGE / rel
        assert path.is_file(), path
        long += long_functions(path, PACKAGE)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_checkers_find_offenders(tmp_path):
    (tmp_path / "pkg").mkdir()
    mod = tmp_path / "pkg" / "mod.py"
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    mod.write_text(
        "def bare(x):\n    return x\n\n\n"
        'def documented():\n    """Has one."""\n\n\n'
        "def _private():\n    pass\n\n\n"
        "class Thing:\n"
        "    def __init__(self):\n        pass\n\n"
        "    @property\n    def size(self):\n        return 1\n\n"
        "    def _helper(self):\n        pass\n\n\n"
        "class _Hidden:\n"
        "    def method(self):\n        pass\n\n"
        f'    def long(self):\n        """Too long, one level down."""\n{body}\n'
    )
    assert undocumented(mod, tmp_path) == [
        "pkg/mod.py:bare",
        "pkg/mod.py:Thing",
        "pkg/mod.py:Thing.size",
    ]
    assert long_functions(mod, tmp_path) == [f"pkg/mod.py:long ({MAX_FUNCTION_LINES + 2} lines)"]


def module_state(path: Path, root: Path) -> list[str]:
    """`rel/path.py:line` of each `global` statement: a function rebinding module state (a
    counter, a once-flag, a registry). State belongs to an object its owner builds and closes."""
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{rel}:{n.lineno} global {', '.join(n.names)}" for n in ast.walk(tree)
            if isinstance(n, ast.Global)]  # fmt: skip


def test_no_function_rebinds_module_state():
    bad = [x for p in sorted(PACKAGE.rglob("*.py")) for x in module_state(p, PACKAGE)]
    assert not bad, "module state rebound by functions:\n" + "\n".join(bad)


def test_the_state_check_sees_a_global(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("_seen = False\n\ndef once():\n    global _seen\n    _seen = True\n")
    assert module_state(f, tmp_path) == ["m.py:4 global _seen"]
