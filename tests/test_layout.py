"""The package layout's import rules (rf2/*/__init__.py docstrings), checked on the source.

Each package may import only the packages below it; Flower and Ray only in the federated
layer and the strategies; the analysis layer and the NumPy fairness module never pull in
the training stack, so a notebook can read run folders on a laptop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> rf2 packages it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "model": {"core", "data"},
    "hetero": {"core", "data"},
    "optim": {"core"},
    "eval": {"core", "data", "model"},
    "runs": {"core"},
    "fl": {"core", "data", "model", "hetero", "optim", "eval", "runs", "strategies", "privacy"},
    "analysis": {"core", "runs", "eval.fairness", "eval.distribution"},
    "cli": {"core", "data", "model", "hetero", "optim", "eval", "runs", "fl", "analysis",
            "strategies", "conf", "privacy"},
    "privacy": {"core", "optim"},
    "strategies": {"core", "optim"},
}
FRAMEWORKS = {"flwr", "ray"}
MAY_USE_FRAMEWORKS = {"fl", "strategies"}
NO_TORCH = {"core", "hetero", "optim", "runs", "analysis", "privacy"}  # + NUMPY_EVAL
# NumPy-only modules of rf2/eval that the analysis layer shares (no torch, only core).
NUMPY_EVAL = ("fairness", "distribution")
# Optional, lazily imported exporters that need torch's TensorBoard writer.
TORCH_EXCEPTIONS = {"rf2/runs/tensorboard_log.py"}


def _sources() -> list[tuple[str, Path]]:
    out = [(p.parent.name, p) for p in sorted((ROOT / "rf2").glob("*/*.py"))]
    out += [("strategies", p) for p in sorted((ROOT / "strategies").glob("*.py"))]
    return out


def _imports(path: Path) -> set[str]:
    """Absolute imports of a module, except those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    nodes = [n for n in ast.walk(tree) if id(n) not in typing_only]
    names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}
    return names


def _rf2_package(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "rf2" or len(parts) < 2:
        return None
    if parts[1] == "eval" and len(parts) > 2 and parts[2] in NUMPY_EVAL:
        return f"eval.{parts[2]}"
    return parts[1]


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for pkg in ALLOWED:
        if pkg == "strategies":
            continue
        doc = ast.get_docstring(ast.parse((ROOT / "rf2" / pkg / "__init__.py").read_text()))
        assert doc and "May import:" in doc, pkg


def test_packages_import_only_downwards() -> None:
    violations = []
    for pkg, path in _sources():
        if pkg not in ALLOWED:
            continue
        allowed = ALLOWED[pkg] | {pkg}
        if pkg == "eval" and path.stem in NUMPY_EVAL:
            allowed = {"core"}
        for name in _imports(path):
            target = _rf2_package(name)
            if target is None:
                continue
            ok = target in allowed or (target.startswith("eval.") and "eval" in allowed)
            if not ok:
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, violations


def test_flower_and_ray_only_in_the_federated_layer() -> None:
    bad = [f"{p.relative_to(ROOT)}: {n}" for pkg, p in _sources() for n in _imports(p)
           if n.split(".")[0] in FRAMEWORKS and pkg not in MAY_USE_FRAMEWORKS]
    assert not bad, bad


def test_numpy_layers_never_import_torch() -> None:
    files = [p for pkg, p in _sources() if pkg in NO_TORCH]
    files += [ROOT / "rf2" / "eval" / f"{name}.py" for name in NUMPY_EVAL]
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in files for n in _imports(p)
           if n.split(".")[0] == "torch" and str(p.relative_to(ROOT)) not in TORCH_EXCEPTIONS]
    assert not bad, bad


def test_no_module_left_flat_in_rf2() -> None:
    flat = sorted(p.name for p in (ROOT / "rf2").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"], flat
