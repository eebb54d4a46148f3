"""The package's layout: lesson modules in front, the course's machinery in named subpackages,
imports that point one way only.

Layers, lowest first (an import may point to its own layer or a lower one, never up):

0. ``course_utils.course``: profiles, recipes, stages, data, the world, models, chat, reporting;
1. the modules at ``course_utils/``'s top level, each backing a lesson;
2. ``course_utils.grading``, ``course_utils.notebook_tools``, ``course_utils.builds``: tools that
   run lessons, grade exercises or build the shipped materials.

Every import of ``course_utils`` is read, at the top of a file or inside a function (except those
under ``if TYPE_CHECKING:``, which never run), and the graph they make must have no cycle.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from course_utils.course.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "course_utils"
TOOLS = ("grading", "notebook_tools", "builds")


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "course":
        return 0
    if len(parts) > 2 and parts[1] in TOOLS:
        return 2
    return 1


def package_imports(package: Path) -> list[tuple[str, str, bool]]:
    """``(importer, imported, inside a function)`` for every import of a module of ``package``."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            targets = [t for t in targets if t in modules and t != package.name]
            ancestors, inside_function, type_checking = node, False, False
            while ancestors in parents:
                ancestors = parents[ancestors]
                inside_function |= isinstance(ancestors, (ast.FunctionDef, ast.AsyncFunctionDef))
                type_checking |= (isinstance(ancestors, ast.If)
                                  and "TYPE_CHECKING" in ast.unparse(ancestors.test))
            if not type_checking:
                found += [(name, target, inside_function) for target in targets]
    return found


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(imports) -> list[str]:
    return sorted({f"{a} -> {b}" for a, b, _ in imports if layer(a) < layer(b)})


def test_the_package_has_no_import_cycle_and_no_upward_import():
    imports = package_imports(PACKAGE)
    assert len(imports) > 50  # the reader found the package's imports
    assert cycles([(a, b) for a, b, _ in imports]) == []
    assert upward(imports) == []


def test_no_module_imports_the_package_inside_a_function():
    """Imports of course_utils stand at the top of each file, where a reader sees them."""
    hidden = sorted({f"{a} imports {b}" for a, b, inside in package_imports(PACKAGE) if inside})
    assert hidden == []


def test_the_reader_finds_what_it_must_refuse(tmp_path):
    """The checks above fail on a cycle made by a function-local import, on an upward import and
    on a relative one, and ignore imports under TYPE_CHECKING."""
    package = tmp_path / "course_utils"
    (package / "course").mkdir(parents=True)
    (package / "grading").mkdir()
    for init in ("__init__.py", "course/__init__.py", "grading/__init__.py"):
        (package / init).write_text("")
    (package / "course" / "stages.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from course_utils import dpo\n"
        "def build():\n    from course_utils import ppo\n")
    (package / "ppo.py").write_text("from course_utils.course import stages\n")
    (package / "dpo.py").write_text("from .grading import grade\n")
    (package / "grading" / "grade.py").write_text("import course_utils.ppo\n")
    imports = package_imports(package)
    assert ("course_utils.course.stages", "course_utils.dpo", False) not in imports
    assert cycles([(a, b) for a, b, _ in imports]) == [
        ["course_utils.course.stages", "course_utils.ppo"]]
    assert upward(imports) == ["course_utils.course.stages -> course_utils.ppo",
                               "course_utils.dpo -> course_utils.grading.grade"]
    assert [(a, b) for a, b, inside in imports if inside] == [
        ("course_utils.course.stages", "course_utils.ppo")]


def top_level_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def test_fewer_than_twenty_modules_stand_in_front_and_each_backs_a_lesson():
    """Each top-level module is imported by at least one lesson notebook and listed in the
    README's table of lesson modules."""
    modules = top_level_modules()
    assert 10 <= len(modules) < 20, modules
    lesson_code = {path.stem: "\n".join("".join(cell["source"]) for cell in json.loads(
        path.read_text())["cells"] if cell["cell_type"] == "code")
        for path in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    readme = (REPO_ROOT / "README.md").read_text()
    for module in modules:
        users = [stem for stem, code in lesson_code.items()
                 if f"course_utils.{module} import" in code
                 or any(module in line.split(" import ", 1)[1].replace(",", " ").split()
                        for line in code.splitlines() if line.startswith("from course_utils import"))]
        assert users, f"course_utils/{module}.py backs no lesson: move it into a subpackage"
        assert f"`{module}`" in readme, f"the README's map of the package does not name {module}"


@pytest.mark.parametrize("subpackage", ["course", *TOOLS])
def test_every_subpackage_says_what_it_holds(subpackage):
    init = PACKAGE / subpackage / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 60, f"{init} needs a docstring saying what it holds"
    for path in sorted((PACKAGE / subpackage).glob("*.py")):
        if path.name != "__init__.py":
            assert f"``{path.stem}``" in docstring, f"{init}'s docstring does not name {path.stem}"
