"""The import graph reads one way: every megapt module's imports (module-level and inside
functions alike, read from the source with ast) go only to packages of a lower layer, and no
megapt modules import each other in a cycle. A newcomer can then read the packages bottom-up:
config -> data / model -> train -> weights -> tasks -> finetune / eval / generate / export /
planner -> bench -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "megapt"

# package (megapt.<first part>) -> layer; an import must go to a strictly lower layer
LAYERS = {
    "megapt.errors": 0,
    "megapt.urls": 1,
    "megapt.config": 2,
    "megapt.hardware": 2,
    "megapt.kernels": 2,
    "megapt.data": 3,
    "megapt.model": 3,
    "megapt.quantize": 4,
    "megapt.train": 5,  # the engine, trainer, checkpoints (DeepSpeed state)
    "megapt.weights": 6,  # model weights in and out: HF, safetensors, ZeRO consolidation, sources
    "megapt.tasks": 7,  # task models, data and metrics shared by fine-tuning and evaluation
    "megapt.finetune": 8,
    "megapt.eval": 8,
    "megapt.generate": 8,
    "megapt.export": 8,
    "megapt.planner": 8,
    "megapt.bench": 9,
    "megapt.cli": 10,
    "megapt.__main__": 11,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).parts
        if rel[0] == "kernels":  # the kernels (a link to kernels/) import nothing of megapt
            continue
        out[_module_name(path)] = path
    return out


def _is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: a script's entry point, run only as ``python -m``."""
    t = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and len(t.comparators) == 1
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "__main__"
    )


def _walk(tree: ast.AST):
    for child in ast.iter_child_nodes(tree):
        if _is_main_block(child):
            continue
        yield child
        yield from _walk(child)


def _imports(name: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(imported megapt module, line) for every import in the file, resolved to a module; imports
    in the ``if __name__ == "__main__":`` block of a script do not count."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "megapt"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "megapt":
                continue
            for a in node.names:  # `from megapt.x import y`: y may itself be a module
                sub = f"{mod}.{a.name}"
                found.add((sub if sub in known else mod, node.lineno))
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _graph() -> tuple[dict[str, set[tuple[str, int]]], dict[str, Path]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}, mods


def test_every_package_has_a_layer():
    graph, _ = _graph()
    packages = {_package(m) for m in graph if m != "megapt"}
    assert sorted(packages - set(LAYERS)) == []


def test_imports_go_only_to_lower_layers():
    graph, mods = _graph()
    wrong = []
    for mod, targets in graph.items():
        src = _package(mod)
        for target, line in sorted(targets):
            dst = _package(target)
            if dst == src or target == "megapt" or src == "megapt":
                continue
            if LAYERS[dst] >= LAYERS[src]:
                wrong.append(
                    f"{mods[mod].relative_to(ROOT)}:{line}: {src} (layer {LAYERS[src]}) "
                    f"imports {target} (layer {LAYERS[dst]})"
                )
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph, _ = _graph()
    edges = {m: {t for t, _ in ts if t in graph and t != m} for m, ts in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle a reader has to untangle
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(cycles)


def test_the_reader_sees_lazy_relative_and_from_package_imports(tmp_path):
    # the checker itself: an import inside a function, a relative one and `from megapt import x`
    up = tmp_path / "x.py"
    up.write_text(
        "from . import engine\nfrom megapt import planner\n"
        "def f():\n    from megapt.finetune.run import finetune\n"
        "if __name__ == '__main__':\n    from megapt.cli import main\n"
    )
    known = {"megapt.finetune.run", "megapt.train.engine", "megapt.planner"}
    found = _imports("megapt.train.x", up, known)
    assert found == {("megapt.train.engine", 1), ("megapt.planner", 2), ("megapt.finetune.run", 4)}
    assert LAYERS[_package("megapt.finetune.run")] > LAYERS["megapt.train"]  # would be reported
