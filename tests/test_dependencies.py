"""Every library the studio imports is installed by `make setup`: declared in pyproject.toml, or required by a
declared one. (A library installed by hand on one machine makes a feature that fails on every other.)"""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported only where present, each behind its own check: the GPU fast path's kernels and a benchmark's arm.
OPTIONAL = {"liger_kernel", "unsloth", "flash_attn", "triton", "unsloth_zoo"}


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared_closure() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [_name(r) for r in project["dependencies"]]
    todo += [_name(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    seen: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def imported_modules() -> set[str]:
    files = [*ROOT.joinpath("finetune").rglob("*.py"), *ROOT.joinpath("app").rglob("*.py"), ROOT / "launch.py"]
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"finetune", "app", "__future__"} - OPTIONAL


def test_every_imported_library_is_installed_by_setup():
    dists = metadata.packages_distributions()
    allowed = declared_closure()
    missing = []
    for module in sorted(imported_modules()):
        owners = {_name(d) for d in dists.get(module, [])}
        if not owners:
            missing.append(f"{module} (not installed: declare it in pyproject.toml)")
        elif not owners & allowed:
            missing.append(f"{module} (from {', '.join(sorted(owners))}: not in pyproject.toml nor required by it)")
    assert not missing, missing
