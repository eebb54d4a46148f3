"""The nbgrader route, end to end, as the README tells an instructor to run it: a throw-away course
with all ten solution notebooks as one assignment, ``nbgrader generate_assignment``, then
``nbgrader autograde`` of a correct, an untouched and a wrong submission of each.

nbgrader's points must equal the course grader's question by question. The course grader's points
for these very submissions are ``tests/test_grading.py``'s expectations, which that module's class
run checks against ``python -m course_utils.grading.grade`` (the wrong submission here is one of its wrong
variants, alone). What nbgrader releases must be as good as ``exercises/``: the same code and text,
hints kept, and no link to ``solutions/`` or that breaks in ``release/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_grading import ALONE, EXERCISE_VARIANTS, replace_cell

from course_utils.grading.make_exercises import EXERCISES_DIR, SOLUTIONS_DIR, cell_text

ASSIGNMENT = "lab"
SOLUTIONS = sorted(SOLUTIONS_DIR.glob("ex*.ipynb"))
CONFIG = """c = get_config()
c.CourseDirectory.course_id = "course"
c.CourseDirectory.root = {root!r}
"""


def wrong_variant(exercise: str) -> tuple[str, dict, dict]:
    """The exercise's first wrong variant that gets one question wrong and the others right."""
    variants = EXERCISE_VARIANTS[exercise]
    name = next(name for name in variants
                if name != "correct" and f"{exercise}/{name}" not in ALONE)
    return name, *variants[name]


def nbgrader(root: Path, *args: str) -> str:
    """Run ``nbgrader`` in ``root`` as an instructor would, from the course's environment (nbgrader
    calls ``alembic`` from the PATH); fixed hidden inputs, so that a failure can be repeated."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "COURSE_GRADER_SEED": "7", "COURSE_PROFILE": "tiny"}
    result = subprocess.run([str(Path(bin_dir) / "nbgrader"), *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def submission(released: dict, source: dict, answered: bool) -> dict:
    """The released notebook with its solution cells answered from the source (or untouched)."""
    notebook = json.loads(json.dumps(released))
    if answered:
        answers = {cell["metadata"]["nbgrader"]["grade_id"]: cell["source"]
                   for cell in source["cells"]
                   if cell["metadata"].get("nbgrader", {}).get("solution")}
        for cell in notebook["cells"]:
            if cell["metadata"].get("nbgrader", {}).get("solution"):
                cell["source"] = answers[cell["metadata"]["nbgrader"]["grade_id"]]
    return notebook


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The course folder after ``generate_assignment`` and ``autograde``, and autograde's log."""
    root = tmp_path_factory.mktemp("nbgrader-course")
    (root / "nbgrader_config.py").write_text(CONFIG.format(root=str(root)))
    (root / "source" / ASSIGNMENT).mkdir(parents=True)
    for solution in SOLUTIONS:
        shutil.copy(solution, root / "source" / ASSIGNMENT / solution.name)
    nbgrader(root, "generate_assignment", ASSIGNMENT, "--force")
    for solution in SOLUTIONS:
        released = json.loads((root / "release" / ASSIGNMENT / solution.name).read_text())
        source = json.loads(solution.read_text())
        correct = submission(released, source, answered=True)
        wrong = json.loads(json.dumps(correct))
        for marker, code in wrong_variant(solution.stem)[1].items():
            replace_cell(wrong, marker, code)
        for student, notebook in (("correct", correct), ("untouched", released), ("wrong", wrong)):
            folder = root / "submitted" / student / ASSIGNMENT
            folder.mkdir(parents=True, exist_ok=True)
            (folder / solution.name).write_text(json.dumps(notebook))
    log = nbgrader(root, "autograde", ASSIGNMENT)
    return root, log


def nbgrader_points(root: Path, student: str, exercise: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        notebook = gradebook.find_submission_notebook(exercise, ASSIGNMENT, student)
        return {grade.name: grade.score for grade in notebook.grades}


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_nbgrader_gives_the_course_graders_points(course, solution):
    root, _ = course
    exercise = solution.stem
    full = EXERCISE_VARIANTS[exercise]["correct"][1]
    name, _, wrong_points = wrong_variant(exercise)
    assert nbgrader_points(root, "correct", exercise) == full
    assert nbgrader_points(root, "untouched", exercise) == dict.fromkeys(full, 0)
    assert nbgrader_points(root, "wrong", exercise) == wrong_points, name
    assert 0 < sum(wrong_points.values()) < sum(full.values())  # a mixed score, not all or nothing


def test_autograde_warns_only_about_the_hidden_tests_checksums(course):
    """The README tells instructors to expect these warnings: a graded cell whose hidden tests
    nbgrader restores has a checksum other than the released one. Anything else is news."""
    _, log = course
    warnings = [line for line in log.splitlines() if "WARNING" in line
                and "Kernel is running over TCP without encryption" not in line]
    assert warnings and all(re.search(r"Attribute 'checksum' for cell q\d_\w+ has changed", line)
                            for line in warnings), warnings[:3]


def test_hidden_inputs_are_fresh_on_every_run_unless_the_seed_is_set():
    """Under nbgrader the hidden tests run in the student's kernel, where no grader sets the seed:
    each run must still draw new inputs, and ``COURSE_GRADER_SEED`` repeats a run's."""
    import random

    code = "from course_utils.grading.checks import grader_rng; print(grader_rng().random())"
    env = {k: v for k, v in os.environ.items() if k != "COURSE_GRADER_SEED"}

    def draw(**extra) -> float:
        return float(subprocess.run([sys.executable, "-c", code], env={**env, **extra}, check=True,
                                    capture_output=True, text=True).stdout)

    assert draw() != draw()
    assert draw(COURSE_GRADER_SEED="7") == random.Random(7).random()


def release_problems(released: dict, exercise: dict) -> list[str]:
    """What keeps a released notebook from being as good as the exercise: a way to the answers,
    cells that differ from ``exercises/``, links that break in ``release/``, stubs without hints."""
    problems = [f"contains {leak!r}" for leak in ("solutions/", "BEGIN SOLUTION", "HIDDEN TESTS")
                if leak in json.dumps(released)]
    cells = [(c["cell_type"], cell_text(c).rstrip()) for c in released["cells"]]
    if cells != [(c["cell_type"], cell_text(c).rstrip()) for c in exercise["cells"]]:
        problems.append("its cells differ from exercises/")
    markdown = "".join(cell_text(c) for c in released["cells"] if c["cell_type"] == "markdown")
    problems += [f"a relative link {link})"
                 for link in re.findall(r"\]\((?!https?://|#)[^)]*", markdown)]
    stubs = [cell_text(c) for c in released["cells"] if "raise NotImplementedError()" in cell_text(c)]
    if not stubs or not all(re.search(r"# Hint: \S.*\n\s*# YOUR CODE HERE", s) for s in stubs):
        problems.append("a stub without its hint")
    return problems


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_the_released_notebook_is_the_exercise(course, solution):
    """Hints, instructions and links as ``exercises/`` hands them out, nothing of the answers."""
    root, _ = course
    released = json.loads((root / "release" / ASSIGNMENT / solution.name).read_text())
    exercise = json.loads((EXERCISES_DIR / solution.name).read_text())
    assert release_problems(released, exercise) == []


def test_a_badge_pointing_at_the_solutions_fails_the_release_check(tmp_path):
    """The check above can fail: nbgrader releases a solution notebook whose Colab badge opens its
    own answers, and the check names it."""
    solution = SOLUTIONS[0]
    notebook = json.loads(solution.read_text())
    badge = cell_text(notebook["cells"][0])
    assert f"exercises/{solution.name}" in badge
    notebook["cells"][0]["source"] = badge.replace(f"exercises/{solution.name}",
                                                   f"solutions/{solution.name}")
    (tmp_path / "nbgrader_config.py").write_text(CONFIG.format(root=str(tmp_path)))
    (tmp_path / "source" / ASSIGNMENT).mkdir(parents=True)
    (tmp_path / "source" / ASSIGNMENT / solution.name).write_text(json.dumps(notebook))
    nbgrader(tmp_path, "generate_assignment", ASSIGNMENT, "--force")
    released = json.loads((tmp_path / "release" / ASSIGNMENT / solution.name).read_text())
    exercise = json.loads((EXERCISES_DIR / solution.name).read_text())
    assert "contains 'solutions/'" in release_problems(released, exercise)
