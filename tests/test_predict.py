"""Predict, then run (``course_utils.course.predict``): the comparison of a learner's guess with the
measured answer, and every lesson's predict-then-run moments (a question, a guess cell that
defaults to ``None``, a reveal computed from the measurement)."""

import ast
import json
import re

import numpy
import pytest

from course_utils.course.predict import reveal, reveal_number
from course_utils.notebook_tools import lab_time

LESSONS = lab_time.lesson_notebooks()
MINIMUM_PER_LESSON = 2


def test_a_right_guess_a_wrong_guess_and_no_guess(capsys):
    outcomes = {"a": False, "b": True, "c": False}
    assert reveal("b", outcomes, measured="3.2x").right is True
    assert "was right" in capsys.readouterr().out
    wrong = reveal("(A)", outcomes, measured="3.2x")  # the way a learner may type it
    assert (wrong.guess, wrong.answer, wrong.right) == ("a", "b", False)
    assert "Your guess was (a)" in capsys.readouterr().out
    assert reveal(None, outcomes, measured="3.2x").right is None
    assert "did not record a guess" in capsys.readouterr().out


def test_the_answer_is_the_one_choice_the_measurement_matches():
    ratio = 5.0
    assert reveal(None, {"a": ratio < 2, "b": 2 <= ratio < 8, "c": ratio >= 8}, "x").answer == "b"
    assert reveal(None, {"a": numpy.bool_(False), "b": numpy.bool_(True)}, "x").answer == "b"


@pytest.mark.parametrize("outcomes", [{"a": True, "b": True}, {"a": False, "b": False}])
def test_choices_that_overlap_or_leave_a_gap_are_refused(outcomes):
    with pytest.raises(ValueError, match="not exactly one"):
        reveal(None, outcomes, measured="x")


def test_a_guess_outside_the_choices_says_what_to_do():
    with pytest.raises(ValueError, match="not one of the choices.*or to None"):
        reveal("d", {"a": True, "b": False}, measured="x")


def test_a_condition_that_is_not_a_bool_is_refused():
    with pytest.raises(TypeError, match="must be a bool"):
        reveal(None, {"a": 1, "b": 0}, measured="x")


def test_a_numeric_guess_is_compared_by_ratio(capsys):
    assert reveal_number(30.0, 10.0, "memory", "GB") == pytest.approx(3.0)
    assert "3 times the measured value" in capsys.readouterr().out
    assert reveal_number(10.5, 10.0, "memory") == pytest.approx(1.05)
    assert "within 10%" in capsys.readouterr().out
    assert reveal_number(None, 10.0, "memory") is None
    with pytest.raises(ValueError, match="must be a number"):
        reveal_number("ten", 10.0, "memory")


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _moments(path):
    """Each reveal of the lesson: (index of its cell, name of its guess variable)."""
    found = []
    for index, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("reveal", "reveal_number"):
                guess = node.args[0] if node.args else None
                found.append((index, guess.id if isinstance(guess, ast.Name) else None))
    return found


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_every_lesson_asks_the_learner_to_predict_at_least_twice(path):
    moments = lab_time.estimate(path).predictions
    assert moments >= MINIMUM_PER_LESSON, (
        f"{path.name} has {moments} predict-then-run moments in its main line; the course asks for at "
        f"least {MINIMUM_PER_LESSON} (course_utils/course/predict.py shows the pattern)")


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_each_guess_is_asked_before_it_is_revealed_and_defaults_to_none(path):
    cells = _cells(path)
    for reveal_cell, guess in _moments(path):
        assert guess, f"{path.name} cell {reveal_cell}: reveal's first argument must be the guess variable"
        assignment = re.compile(rf"^{guess}\s*=\s*None\b", re.MULTILINE)
        guess_cells = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
                       and assignment.search("".join(c["source"]))]
        assert len(guess_cells) == 1 and guess_cells[0] < reveal_cell, (
            f"{path.name}: {guess} must be set to None in one cell before its reveal (cell {reveal_cell}), "
            f"so that papermill and make test run with the default guess")
        guess_cell = guess_cells[0]
        code = [line for line in "".join(cells[guess_cell]["source"]).splitlines()
                if line.strip() and not line.strip().startswith("#")]
        assert all(re.match(r"^guess\w*\s*=\s*None\b", line) for line in code), (
            f"{path.name} cell {guess_cell}: a guess cell holds only guesses, each set to None")
        questions = [i for i in range(guess_cell) if cells[i]["cell_type"] == "markdown"
                     and "**Predict" in "".join(cells[i]["source"])]
        assert questions and questions[-1] >= guess_cell - 2, (
            f"{path.name}: the guess {guess} (cell {guess_cell}) must follow a Markdown cell that asks "
            f"the question (**Predict.** ...)")
        others = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and i != guess_cell
                  and re.search(rf"^\s*{guess}\s*=", "".join(c["source"]), re.MULTILINE)]
        assert not others, f"{path.name}: {guess} is assigned again in cells {others}"
