"""Lessons sized for a lab (``course_utils.notebook_tools.lab_time``): the reading-time estimate,
each header's statement of it, the README's column, and optional sections the main line does not
need."""

import ast
import json
import re

import pytest

from course_utils.course import paths
from course_utils.notebook_tools import lab_time

LESSONS = lab_time.lesson_notebooks()


def _notebook(tmp_path, cells):
    path = tmp_path / "99_example.ipynb"
    path.write_text(json.dumps({"cells": [
        {"cell_type": kind, "metadata": {}, "source": [text]} for kind, text in cells]}))
    return path


def test_the_estimate_counts_prose_code_predictions_and_figures(tmp_path):
    words = " ".join(["word"] * 300)  # 3 minutes at 100 words a minute
    code = "\n".join([f"x{i} = {i}" for i in range(20)] + ["# a comment", ""])  # 20 lines: 2 minutes
    path = _notebook(tmp_path, [
        ("markdown", "# 99 · Example\n\n" + words),
        ("code", "set_up()\n" * 50),  # the set-up cell: run, not read
        ("code", "PROFILE = 'auto'"),
        ("code", code),
        ("code", "reveal(guess, {'a': True}, measured='x')\nplt.show()"),  # 2 lines + 2 + 1 minutes
        ("markdown", "## Optional A. A detour\n\n" + " ".join(["word"] * 500)),
        ("code", "y = 1\nplt.show()"),
    ])
    estimate = lab_time.estimate(path)
    header_words = 4
    assert estimate.main_minutes == pytest.approx((300 + header_words) / 100 + 2 + 0.2 + 2 + 1)
    assert estimate.optional_minutes == pytest.approx((500 + 5) / 100 + 0.2 + 1)
    assert (estimate.predictions, estimate.optional_sections) == (1, 1)
    assert estimate.main_rounded == 10 and estimate.optional_rounded == 5


@pytest.mark.parametrize("minutes, rounded", [(0.5, 5), (7.4, 5), (7.6, 10), (52.4, 50), (52.6, 55)])
def test_minutes_round_to_the_nearest_five(minutes, rounded):
    assert lab_time.round_minutes(minutes) == rounded


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_every_header_states_the_reading_time_the_estimate_gives(path):
    expected = lab_time.estimate(path).reading_line()
    assert lab_time.stated_line(path) == expected, (
        f"{path.name}'s header says {lab_time.stated_line(path)!r}, the estimate is {expected!r}: run "
        f"python -m course_utils.notebook_tools.lab_time --write")


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_every_main_line_fits_a_lab(path):
    estimate = lab_time.estimate(path)
    assert estimate.cpu_minutes is not None, f"{path.name}: no portability report to read its run time from"
    assert estimate.lab_minutes <= lab_time.LAB_MINUTES, (
        f"{path.name}: its main line takes about {estimate.lab_minutes:.0f} minutes to read and run, more "
        f"than a {lab_time.LAB_MINUTES}-minute lab: move a detour to an optional section at the end")


def _top_level_names(source, kind):
    names = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a cell magic: nothing to check
        return names
    for node in ast.walk(tree):
        if kind == "defined" and isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif kind == "defined" and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif kind == "defined" and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif kind == "used" and isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
    return names


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_optional_sections_come_last_and_the_main_line_does_not_need_them(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                  and lab_time.OPTIONAL_HEADING.search("".join(c["source"]))), len(cells))
    later_sections = [line for c in cells[first:] if c["cell_type"] == "markdown"
                      for line in "".join(c["source"]).splitlines() if re.match(r"^## ", line)]
    allowed = re.compile(r"^## (Optional\b|Summary|What to remember|Further reading|References|Exercises)")
    assert all(allowed.match(line) for line in later_sections), (
        f"{path.name}: after its first optional section, a main-line section: "
        f"{[s for s in later_sections if not allowed.match(s)]}")
    main_defined, main_used, optional_defined = set(), set(), set()
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if index < first:
            main_defined |= _top_level_names(source, "defined")
            main_used |= _top_level_names(source, "used")
        else:
            optional_defined |= _top_level_names(source, "defined")
    needed = (main_used & optional_defined) - main_defined
    assert not needed, f"{path.name}: the main line uses {sorted(needed)}, defined only in optional sections"


def test_the_readme_course_map_gives_each_lessons_reading_time():
    readme = (paths.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    header = next(line for line in readme.splitlines() if line.startswith("| # | notebook"))
    column = [cell.strip() for cell in header.strip("|").split("|")].index("reading (main + optional)")
    for path in LESSONS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| {path.name[:2]} |"))
        stated = [cell.strip() for cell in row.strip("|").split("|")][column]
        estimate = lab_time.estimate(path)
        expected = f"{estimate.main_rounded} min" + (
            f" + {estimate.optional_rounded}" if estimate.optional_sections else "")
        assert stated == expected, f"README course map, {path.name[:2]}: {stated!r}, estimate {expected!r}"


def test_the_readmes_promise_of_cpu_minutes_is_what_the_portability_runs_measured():
    readme = (paths.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    promise = re.search(r"in (\d+) seconds to (\d+) minutes each \(measured on a\s+2-core machine", readme)
    assert promise, "the README's opening no longer states the lessons' CPU time as measured"
    fastest, slowest = int(promise.group(1)), int(promise.group(2))
    seconds = [lab_time.cpu_minutes(path.stem) * 60 for path in LESSONS]
    assert fastest <= min(seconds) and max(seconds) <= slowest * 60, (
        f"the README says {fastest} s to {slowest} min; the lessons' median runs took "
        f"{min(seconds):.0f} s to {max(seconds) / 60:.1f} min")


def test_the_readmes_lab_plan_is_the_plan_of_todays_lessons_and_exercises():
    readme = (paths.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    stated = readme.split(lab_time.PLAN_START, 1)[1].split(lab_time.PLAN_END, 1)[0].strip()
    assert stated == lab_time.plan_markdown(), (
        "the README's lab plan is not today's: run python -m course_utils.notebook_tools.lab_time --write")
    for lab in lab_time.lab_plan():  # what the plan promises, recomputed from its parts
        lesson_minutes = sum(lab_time.estimate(path).lab_minutes for path in LESSONS
                             if path.name[:2] in lab["lessons"])
        exercise_minutes = sum(e.minutes for e in lab_time.exercises() if e.name in lab["exercises"])
        assert lesson_minutes + exercise_minutes == pytest.approx(lab["minutes"])
        assert lab["minutes"] <= lab_time.LAB_MINUTES or len(lab["lessons"]) == 1


def test_every_exercise_names_its_lessons_and_its_minutes():
    found = lab_time.exercises()
    assert len(found) == len(list((paths.REPO_ROOT / "solutions").glob("ex*.ipynb")))
    practised = {lesson for exercise in found for lesson in exercise.lessons}
    assert {f"{n:02d}" for n in range(1, 12)} <= practised, "a lesson from 01 to 11 has no exercise"
