"""The package's layering, checked from the source: each module imports only its own layer and the layers
below it, and the module import graph has no cycles (docs/architecture.md has the map)."""

from __future__ import annotations

import ast
from pathlib import Path

import midpo

ROOT = Path(midpo.__file__).resolve().parent
# lowest first; a module may import its own layer and any layer before it
LAYERS = (
    ("midpo.errors",),
    ("midpo.config",),
    ("midpo.core",),  # may not import midpo.config either (test_core_imports_no_distributed_config_or_io)
    ("midpo.runtime",),
    ("midpo.data", "midpo.train"),  # siblings: neither imports the other
    ("midpo.stages",),
    ("midpo.demo",),
    ("midpo.cli", "midpo.__main__"),
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer_of(name: str) -> tuple[int, str] | None:
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                return i, prefix
    return None


def imports_of(path: Path) -> set[str]:
    """Every midpo module a file imports, at any depth of the file (function-local imports included)."""
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "midpo")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "midpo":
                continue
            out.add(mod)
            for a in node.names:  # `from midpo.core import losses` imports the submodule
                if (ROOT.parent / (mod.replace(".", "/") + "/" + a.name + ".py")).exists():
                    out.add(f"{mod}.{a.name}")
    out.discard(me)
    return out


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "midpo" and layer_of(m) is None]
    assert not missing, f"modules outside the layer map (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_module_imports_a_layer_above_it_or_a_sibling_layer():
    bad = []
    for name, path in modules().items():
        mine = layer_of(name)
        if mine is None:
            continue
        for dep in sorted(imports_of(path)):
            theirs = layer_of(dep)
            if theirs is None:
                continue
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                bad.append(f"{name} ({mine[1]}) imports {dep} ({theirs[1]})")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {d for d in imports_of(p) if d in modules()} for name, p in modules().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_imports_no_distributed_config_or_io():
    """core/ is pure tensor code: no torch.distributed, no deepspeed, no config, no file I/O modules."""
    banned = ("torch.distributed", "deepspeed", "midpo.config", "datasets", "pyarrow", "transformers")
    bad = []
    for name, path in modules().items():
        if not name.startswith("midpo.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{name} imports {m}" for m in mods if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not bad, "\n".join(bad)
