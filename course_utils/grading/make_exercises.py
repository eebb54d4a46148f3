"""Generate ``exercises/`` from ``solutions/``: one source for every exercise notebook.

A solution notebook marks what students must write and what they must not see, with nbgrader's
markers, so that ``make exercises`` and ``nbgrader generate_assignment`` hand out the same code
from the same file (``tests/test_nbgrader.py`` checks that they do):

- ``### BEGIN SOLUTION`` ... ``### END SOLUTION``: replaced by nbgrader's own stub,
  ``# YOUR CODE HERE`` and ``raise NotImplementedError()``, at the same indentation. The hint is
  a ``# Hint: ...`` comment on the line just above the block, outside it, so it survives both
  routes; a block without one is an error.
- ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS``: removed. The grader restores them from
  the solution notebook, so students cannot read or delete them.

Outputs and execution counts are stripped. A solution notebook's Markdown may not link to
``solutions/`` (its Colab badge opens the exercise) nor use relative links, which break in an
nbgrader release folder. ``python -m course_utils.grading.make_exercises`` (``make exercises``) regenerates
every exercise; ``--check`` only reports stale files (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from course_utils.course.paths import REPO_ROOT

SOLUTIONS_DIR = REPO_ROOT / "solutions"
EXERCISES_DIR = REPO_ROOT / "exercises"

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
HINT_MARK = "# Hint:"
#: nbgrader's default stub for Python (``ClearSolutions.code_stub``), so both routes hand out the same
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
#: Markdown links an exercise may not carry: to the answers, or relative (an nbgrader release lives
#: in ``release/<assignment>/``, where ``../notebooks/`` does not exist)
FORBIDDEN_LINK = re.compile(r"\]\((?:[^)]*/)?solutions/|\]\((?!https?://|#)[^)]*\)")


class ExerciseFormatError(ValueError):
    """A solution notebook whose markers do not pair up."""


def _blocks(lines: list[str], begin: str, end: str, where: str):
    """Yield ``(start, stop)`` line index pairs of each marked block (inclusive markers)."""
    start = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(begin):
            if start is not None:
                raise ExerciseFormatError(f"{where}: nested '{begin}' at line {i + 1}")
            start = i
        elif stripped.startswith(end):
            if start is None:
                raise ExerciseFormatError(f"{where}: '{end}' without '{begin}' at line {i + 1}")
            yield start, i
            start = None
    if start is not None:
        raise ExerciseFormatError(f"{where}: '{begin}' at line {start + 1} is never closed")


def strip_solution(source: str, where: str = "cell") -> str:
    """Replace every solution block in ``source`` with nbgrader's stub; each block must have a
    ``# Hint: ...`` line just above it, which stays."""
    lines = source.split("\n")
    out, position = [], 0
    for start, stop in _blocks(lines, BEGIN_SOLUTION, END_SOLUTION, where):
        if start == 0 or not lines[start - 1].strip().startswith(HINT_MARK):
            raise ExerciseFormatError(f"{where}: put a '{HINT_MARK} ...' line just above the "
                                      f"'{BEGIN_SOLUTION}' at line {start + 1}")
        out += lines[position:start]
        indent = re.match(r"\s*", lines[start]).group(0)
        out += [indent + line for line in STUB]
        position = stop + 1
    out += lines[position:]
    return "\n".join(out)


def strip_hidden_tests(source: str, where: str = "cell") -> str:
    """Remove every hidden-test block (markers included) from ``source``."""
    lines = source.split("\n")
    out, position = [], 0
    for start, stop in _blocks(lines, BEGIN_HIDDEN, END_HIDDEN, where):
        out += lines[position:start]
        position = stop + 1
    out += lines[position:]
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def cell_text(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def make_exercise(solution: dict, exercise_path: str, solution_path: str) -> dict:
    """The exercise notebook (a dict) generated from a solution notebook (a dict)."""
    notebook = json.loads(json.dumps(solution))  # deep copy
    for index, cell in enumerate(notebook["cells"]):
        text = cell_text(cell)
        where = f"{solution_path} cell {index}"
        if cell["cell_type"] == "code":
            text = strip_hidden_tests(strip_solution(text, where), where)
            cell["outputs"], cell["execution_count"] = [], None
        elif FORBIDDEN_LINK.search(text):
            link = FORBIDDEN_LINK.search(text).group(0)
            raise ExerciseFormatError(
                f"{where}: the link {link}...) would reach an answer or break where nbgrader "
                f"releases the notebook; link to {exercise_path} or to a full https:// address")
        cell["source"] = text.splitlines(keepends=True)
    notebook["metadata"].pop("widgets", None)
    return notebook


def exercise_text(solution_file: Path) -> str:
    """The exact text of the exercise generated from ``solution_file``."""
    solution = json.loads(solution_file.read_text())
    exercise = make_exercise(solution, f"exercises/{solution_file.name}",
                             f"solutions/{solution_file.name}")
    return json.dumps(exercise, indent=1, ensure_ascii=False) + "\n"


def generate(solutions_dir: Path = SOLUTIONS_DIR, exercises_dir: Path = EXERCISES_DIR,
             check: bool = False) -> list[Path]:
    """Write (or, with ``check``, only compare) every exercise; return the stale or written paths."""
    changed = []
    expected = {p.name: exercise_text(p) for p in sorted(solutions_dir.glob("ex*.ipynb"))}
    for name, text in expected.items():
        target = exercises_dir / name
        if not target.exists() or target.read_text() != text:
            changed.append(target)
            if not check:
                exercises_dir.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    orphans = [p for p in exercises_dir.glob("ex*.ipynb") if p.name not in expected]
    changed += orphans
    if not check:
        for orphan in orphans:
            orphan.unlink()
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate exercises/ from solutions/.")
    parser.add_argument("--check", action="store_true", help="only report stale exercises")
    args = parser.parse_args(argv)
    changed = generate(check=args.check)
    for path in changed:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(REPO_ROOT)}")
    if args.check and changed:
        print("run `make exercises` to regenerate them", file=sys.stderr)
        return 1
    if not changed:
        print("exercises/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
