"""The floor plan (../shared/DESIGN.md, README "Layout"), checked on every change: each module
imports only its own floor or below, imports inside functions included; no import circles; no
file in jaxdistill/ over 400 lines; the README's layout names what is there."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxdistill"
GROUND = {"errors", "mesh", "runs", "settings", "stats", "aot", "models", "data", "prompts", "sampling", "rl"}
SYSTEMS = {"distill", "teachers", "router"}
TOP = {"main", "__main__", "__init__"}
MAY_ALSO_USE = {"distill": {"teachers"}}  # the teacher stack as a distillation target


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxdistill modules it imports anywhere in its file (functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("jaxdistill")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxdistill"):
                for alias in node.names:  # `from jaxdistill.x import y` may import the module x.y
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        graph[name] = {t for t in targets if t in modules} - {name}
    return graph


def floor_unit(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_import_runs_down_a_floor_or_stays_on_its_own():
    assert {floor_unit(m) for m in import_graph()} <= GROUND | SYSTEMS | TOP, "a new top-level module needs a floor"
    upward = []
    for module, targets in import_graph().items():
        unit = floor_unit(module)
        if unit in TOP:
            continue
        for target in targets:
            other = floor_unit(target)
            allowed = GROUND if unit in GROUND else GROUND | {unit} | MAY_ALSO_USE.get(unit, set())
            if other != unit and other not in allowed:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_there_are_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = "def f():\n    from jaxdistill.distill import train\n"
    imported = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert imported == ["jaxdistill.distill"]  # the walk reaches function bodies, where the old circle hid
    assert "jaxdistill.data.metrics" in import_graph()["jaxdistill.data.qa"]


def test_no_file_in_the_package_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_readme_layout_names_every_top_level_piece_and_only_those():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    named = set(re.findall(r"jaxdistill/([\w.]+)", layout))
    present = {p.name for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("_")}
    present -= {"gpu_targets"}  # data files of aot.py
    assert named == present, (named - present, present - named)
