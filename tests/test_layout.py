"""The package layout of docs/DESIGN.md: lower layers never import higher ones.

Layers, bottom up: infra -> models, rewards, tasks -> rollout -> rl -> run -> tools -> the thin
entry modules at the top of `htpo_jax/` (`python -m htpo_jax.train`, `htpo_jax.loss`, ...).
`integrations/` (glue to other trainers, each behind its own extra) sits above all of them: it may
import rl and models, and no other module of the package imports it.
Every import counts, also one inside a function.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "htpo_jax"
LAYERS = {"infra": 0, "models": 1, "rewards": 1, "tasks": 1, "rollout": 2, "rl": 3, "run": 4,
          "tools": 5, "integrations": 7}  # fmt: skip
ENTRY = 6  # htpo_jax/<name>.py


def layer_of(module: str) -> int:
    """The layer of a dotted module name under htpo_jax."""
    parts = module.split(".")
    assert parts[0] == "htpo_jax", module
    if len(parts) == 1:
        return -1  # the package itself: a docstring, importable from anywhere
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    assert (PKG / f"{parts[1]}.py").is_file(), f"{module}: not a module of the layout"
    return ENTRY


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every htpo_jax import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("htpo_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "htpo_jax":  # from htpo_jax import rl  -> the named sub-packages
                out += [(node.lineno, f"htpo_jax.{a.name}") for a in node.names]
            elif node.module.startswith("htpo_jax."):
                out.append((node.lineno, node.module))
    return out


def test_every_module_sits_in_a_layer():
    flat = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    dirs = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(dirs) == set(LAYERS), dirs
    # the flat modules are only the thin entries (each under 30 lines, no logic of its own)
    for name in flat:
        assert len((PKG / f"{name}.py").read_text().splitlines()) < 30, name


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for line, other in imports_of(path):
            if layer_of(other) > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({me}) imports {other}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The rule is not vacuous: an rl module importing run is caught."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from htpo_jax.run.config import Config\n")
    ((line, other),) = imports_of(f)
    assert line == 2 and layer_of(other) > LAYERS["rl"]


def test_nothing_imports_the_integrations():
    """An integration needs its extra (tunix, ...): a package module importing one would make
    the extra a dependency of the trainer."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if module_name(path).startswith("htpo_jax.integrations"):
            continue
        for line, other in imports_of(path):
            if other.startswith("htpo_jax.integrations"):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {other}")
    assert not bad, "\n".join(bad)
    assert layer_of("htpo_jax.integrations.tunix") > ENTRY  # the top: it may import any layer
