"""The package's layers, read from its own imports: the torch-only core at the bottom; samplers, backbones and
the diffusers conversions (interop/) above it on torch alone; the Lightning side (training/, data/, then
callbacks/) above those; the command line on top; and no import cycles, at run time or through type-only imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ddpm"
# layer of each top-level part; a module may import its own layer or lower ones only
LAYERS = {
    "core": 0,
    "samplers": 1,
    "backbones": 1,
    "interop": 1,
    "ema": 1,
    "metrics": 1,
    "training": 2,
    "data": 2,
    "callbacks": 3,
    "cli": 4,
    "__main__": 5,
}
TORCH_ONLY = ("core", "samplers", "backbones", "interop", "ema", "metrics")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__") or "__init__"] = path
    return out


def _part(module: str) -> str:
    for key in sorted(LAYERS, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return module  # the package's own __init__


def _imports(module: str, path: Path, type_only: bool = False) -> set[str]:
    """Package modules that ``module`` imports at module level (``type_only``: inside ``if TYPE_CHECKING`` too)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()

    def visit(nodes, in_type_block=False):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if type_only:
                    visit(node.body, True)
                continue
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = module.split(".") if is_package and module != "__init__" else module.split(".")[:-1]
                if module == "__init__":
                    base = []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                found.update(n for n in names if n)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_ddpm."):
                found.add(node.module.removeprefix("lightning_ddpm."))

    visit(tree.body)
    modules = _modules()
    return {m if m in modules else m.rsplit(".", 1)[0] for m in found if m in modules or m.rsplit(".", 1)[0] in modules}


def test_every_module_imports_its_own_layer_or_lower_ones():
    wrong = []
    for module, path in _modules().items():
        if module == "__init__":
            continue  # the public names, loaded lazily
        assert _part(module) in LAYERS, (
            f"lightning_ddpm.{module} belongs to no layer: put it in one of {sorted(LAYERS)}"
        )
        for target in _imports(module, path, type_only=True):
            if target != "__init__" and LAYERS[_part(target)] > LAYERS[_part(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up the layers: " + ", ".join(wrong)


@pytest.mark.parametrize("type_only", [False, True], ids=["run_time", "type_only_included"])
def test_no_import_cycles(type_only):
    """Not at run time, and not through ``if TYPE_CHECKING`` imports either: shared types live in core/types.py."""
    graph = {m: _imports(m, p, type_only=type_only) - {m} for m, p in _modules().items()}
    seen, stack, cycles = set(), [], []

    def walk(node):
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            walk(nxt)
        stack.pop()

    for module in sorted(graph):
        walk(module)
    assert not cycles, cycles


def test_the_shared_types_are_a_leaf():
    assert _imports("core.types", PACKAGE / "core" / "types.py", type_only=True) == set()


@pytest.mark.parametrize("part", TORCH_ONLY)
def test_the_torch_only_parts_load_no_lightning(part):
    modules = [f"lightning_ddpm.{m}" for m in _modules() if _part(m) == part]
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'torchmetrics', 'jsonargparse', 'diffusers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"{part}: {result.stdout}"
