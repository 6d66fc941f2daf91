"""One-way layering: no import cycle inside edge_runtime, and pack/ stays below the runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edge_runtime"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> edge_runtime modules it imports (anywhere in the file, function-level imports too)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_pack_does_not_import_the_layers_above_it():
    above = ("edge_runtime.sparsity", "edge_runtime.runtime", "edge_runtime.serve", "edge_runtime.monitor")
    bad = {m: sorted(n for n in deps if n.startswith(above))
           for m, deps in _imports().items() if m.startswith("edge_runtime.pack")}
    assert not {m: d for m, d in bad.items() if d}


def test_importing_pack_needs_no_tokenizers():
    code = ("import sys; sys.modules['tokenizers'] = None; import edge_runtime.pack.loader, edge_runtime.pack.convert;"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
