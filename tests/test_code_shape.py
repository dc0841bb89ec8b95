"""The code's shape stays readable: short functions and classes, no import cycles, and the UI process torch-free."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "app")
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250


def sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_functions_and_classes_are_short():
    too_long = {}
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long[f"{path.relative_to(ROOT)}:{node.name}"] = f"line {node.lineno}: {lines} lines > {limit}"
    assert not too_long, "\n".join(f"{k} ({v})" for k, v in too_long.items())


def module_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module imports when it is loaded (module-level statements, not function bodies)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {m for m in found if m in known}


def test_no_import_cycles():
    trees = {module_name(p): t for p, t in sources()}
    graph = {m: module_imports(t, set(trees)) for m, t in trees.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path + [m, dep]
            if dep not in state and (cycle := visit(dep, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_ui_process_imports_no_torch():
    """Loading the whole UI and the engine's public packages pulls in neither torch nor transformers."""
    code = ("import sys, app.main, finetune, finetune.store, finetune.recipe, finetune.evaluation.evaluate, "
            "finetune.evaluation.generate, finetune.rundir\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
