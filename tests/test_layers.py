"""The package's shape: imports run one way, and the light modules stay light.

Guards issue 10's findings: an import circle hidden in function-level imports (memory <-> models
<-> trace), and `import kvviz.figures.step` pulling in torch through a package `__init__`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

KVVIZ = Path(__file__).resolve().parents[1] / "kvviz"

# what each part of kvviz may import from kvviz (itself always): the layering in README's Layout.
# validate (the one error type, input checks, settings) sits at the bottom beside geometry.
ALLOWED = {
    "validate": set(),
    "geometry": {"validate"},
    "engine": {"geometry", "validate"},
    "variants": {"engine", "geometry", "validate"},
    "economics": {"engine", "geometry", "validate"},
    "serving": {"engine", "geometry", "validate"},
    "figures": {"engine", "economics", "geometry", "serving", "validate", "variants"},  # variants: its torch-free evidence
    "api": {"engine", "variants", "validate"},
    "quiz": {"engine", "economics", "geometry", "validate"},  # engine includes the variant interface (engine/variant.py)
}


def kvviz_imports(path: Path) -> set[str]:
    """Every kvviz module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvviz"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvviz")}
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "kvviz"


def test_imports_run_one_way():
    bad = []
    for path in KVVIZ.rglob("*.py"):
        rel = path.relative_to(KVVIZ.parent).with_suffix("")
        me = part(".".join(rel.parts).replace(".__init__", "").removesuffix(".py"))
        if me not in ALLOWED:
            continue
        for target in kvviz_imports(path):
            other = part(target)
            if other not in (me, "kvviz") and other not in ALLOWED[me]:
                bad.append(f"{rel}: imports {target} ({me} may import {sorted(ALLOWED[me]) or 'nothing'})")
            if other == "kvviz" and target == "kvviz":
                bad.append(f"{rel}: imports the kvviz package itself (a circle through __init__)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["kvviz", "kvviz.validate", "kvviz.geometry", "kvviz.engine.config",
                                    "kvviz.engine.trace", "kvviz.figures.step",
                                    "kvviz.figures.variants", "kvviz.variants.evidence",
                                    "kvviz.variants.explain", "kvviz.figures.cost", "kvviz.figures.memory",
                                    "kvviz.figures.paged", "kvviz.economics.memory", "kvviz.economics.paged",
                                    "kvviz.serving", "kvviz.serving.records", "kvviz.serving.hooks",
                                    "kvviz.figures.quiz", "kvviz.quiz.questions"])
def test_light_modules_import_without_torch_or_transformers(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} pulled in {out.stdout.strip()}"
