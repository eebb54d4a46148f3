"""Exercise generation: one source, markers replaced, hidden tests removed, never stale."""

from __future__ import annotations

import json

import pytest

from course_utils.grading import make_exercises


def test_exercises_folder_is_up_to_date():
    assert make_exercises.generate(check=True) == [], "run `make exercises`"


def test_every_solution_has_graded_cells_and_an_exercise():
    from course_utils.grading.grade import graded_cells

    solutions = sorted(make_exercises.SOLUTIONS_DIR.glob("ex*.ipynb"))
    assert solutions
    for path in solutions:
        assert graded_cells(json.loads(path.read_text())), path
        assert (make_exercises.EXERCISES_DIR / path.name).exists()


def test_generated_exercises_hold_no_solutions_or_hidden_tests():
    for path in make_exercises.EXERCISES_DIR.glob("ex*.ipynb"):
        text = path.read_text()
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS", "solutions/"):
            assert marker not in text, (path.name, marker)
        assert "raise NotImplementedError()" in text


def test_solution_block_becomes_nbgraders_stub_under_its_hint():
    source = ("def f(x):\n    \"\"\"Double x.\"\"\"\n    # Hint: multiply\n    ### BEGIN SOLUTION\n"
              "    return 2 * x\n    ### END SOLUTION\n\nprint(f(2))")
    stub = make_exercises.strip_solution(source)
    assert stub == ("def f(x):\n    \"\"\"Double x.\"\"\"\n    # Hint: multiply\n    # YOUR CODE HERE\n"
                    "    raise NotImplementedError()\n\nprint(f(2))")
    namespace = {}
    exec(stub.replace("print(f(2))", ""), namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](2)


def test_a_solution_block_without_a_hint_above_it_is_an_error():
    with pytest.raises(make_exercises.ExerciseFormatError, match="# Hint:"):
        make_exercises.strip_solution("x = 0\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION")


@pytest.mark.parametrize("link", [
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/o/r/blob/main/solutions/ex01_memory.ipynb)",
    "[the answers](../solutions/ex01_memory.ipynb)", "[notebook 01](../notebooks/01_x.ipynb)"])
def test_a_link_to_the_answers_or_a_relative_link_is_an_error(link):
    solution = json.loads((make_exercises.SOLUTIONS_DIR / "ex01_memory.ipynb").read_text())
    solution["cells"][0]["source"] = f"# Exercise\n\n{link}\n"
    with pytest.raises(make_exercises.ExerciseFormatError, match="link"):
        make_exercises.make_exercise(solution, "exercises/ex01_memory.ipynb", "solutions/ex01_memory.ipynb")


def test_hidden_tests_are_removed_with_their_markers():
    source = "check(a)\n### BEGIN HIDDEN TESTS\ncheck(b)\n### END HIDDEN TESTS\nprint('ok')"
    assert make_exercises.strip_hidden_tests(source) == "check(a)\nprint('ok')"


@pytest.mark.parametrize("source", ["# Hint: h\n### BEGIN SOLUTION\nx = 1",
                                    "x = 1\n### END SOLUTION",
                                    "# Hint: h\n### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"])
def test_unpaired_markers_are_an_error(source):
    with pytest.raises(make_exercises.ExerciseFormatError):
        make_exercises.strip_solution(source, where="test cell")


def test_check_mode_reports_a_stale_exercise(tmp_path):
    solutions, generated = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    source = next(make_exercises.SOLUTIONS_DIR.glob("ex*.ipynb"))
    (solutions / source.name).write_text(source.read_text())
    assert make_exercises.generate(solutions, generated, check=True) == [generated / source.name]
    make_exercises.generate(solutions, generated)
    assert make_exercises.generate(solutions, generated, check=True) == []
    (generated / "ex99_orphan.ipynb").write_text("{}")
    assert make_exercises.generate(solutions, generated, check=True) == [
        generated / "ex99_orphan.ipynb"]


def test_nbgrader_metadata_agrees_with_the_course_metadata():
    for path in make_exercises.SOLUTIONS_DIR.glob("ex*.ipynb"):
        for cell in json.loads(path.read_text())["cells"]:
            course = cell["metadata"].get("course", {})
            nbgrader = cell["metadata"].get("nbgrader")
            if "grade_id" in course:
                assert nbgrader["grade"] and nbgrader["locked"] and not nbgrader["solution"]
                assert (nbgrader["grade_id"], nbgrader["points"]) == (course["grade_id"],
                                                                      course["points"])
            elif "BEGIN SOLUTION" in "".join(cell["source"]):
                assert nbgrader["solution"] and not nbgrader["grade"]


@pytest.mark.parametrize("actual, expected, message", [
    ([-100, 5, 6], [-100, 5, -100], "first difference at index 2: expected -100, got 6"),
    ("<|user|>\nHi</s>", "<|user|>\nHi</s>\n", "lengths differ: expected 16, got 15"),
    ("ab", "ax", "first difference at character 1: expected 'x', got 'b'"),
    (3, 4, "expected 4, got 3"),
])
def test_check_equal_says_where_answers_differ(actual, expected, message):
    from course_utils.grading.checks import check_equal

    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace("|", r"\|")):
        check_equal(actual, expected)
    check_equal(expected, expected)
