"""Issue 36: exercises that need reasoning, and hints that do not give the answer away.

- every lesson 01-11 is named in some exercise's header (``**Lessons**: ...``) and has at least
  one question that asks for a choice, a reading or a diagnosis (listed below, and checked to be
  graded questions of the notebooks);
- no hint restates its answer: neither the ``# Hint:`` line above a solution block nor the grader's
  hint of a question shares four code tokens in a row with the solution, or holds a formula.
"""

from __future__ import annotations

import json
import re

import pytest

from course_utils.grading.grade import graded_cells
from course_utils.grading.make_exercises import (
    BEGIN_SOLUTION,
    END_SOLUTION,
    HINT_MARK,
    SOLUTIONS_DIR,
    cell_text,
)

SOLUTIONS = sorted(SOLUTIONS_DIR.glob("ex*.ipynb"))

#: lesson -> (exercise, graded question) of its reasoning questions
REASONING = {
    "01": [("ex01_memory", "q5_choose_zero_stage")],
    "02": [("ex03_adapters_ia3", "q4_peft_family")],
    "03": [("ex10_prompt_prefix", "q1_read_soft_prompt"), ("ex10_prompt_prefix", "q2_prefix_key_shape")],
    "04": [("ex02_lora", "q4_choose_lora")],
    "05": [("ex03_adapters_ia3", "q5_compare_methods")],
    "06": [("ex04_nf4", "q5_lower_error")],
    "07": [("ex05_sft_data", "q5_diagnose_run")],
    "08": [("ex06_reward_model", "q4_calibration_verdicts")],
    "09": [("ex07_ppo", "q4_read_kl_sweep")],
    "10": [("ex08_dpo", "q4_diagnose_dpo")],
    "11": [("ex09_evaluation", "q4_win_verdict")],
}

#: code tokens; a chat template's special tokens (``</s>``, ``<|user|>``) count as one
TOKEN = re.compile(r"<\|?/?\w+\|?>|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\*\*|//|<<|>>"
                   r"|[-+*/@%<>=!]=?|[()\[\].,:]")
#: an arithmetic expression: two operands joined by an operator (``alpha / r``, ``x @ A``)
FORMULA = re.compile(r"[\w)\]]\s*(?:\*\*|//|<<|>>|[<>]=?|[-+*/@%])\s*[\w(]")
#: a call, a module path or an attribute (``F.logsigmoid(``, ``torch.nn.functional``, ``x.T``): code
CODE = re.compile(r"\w\.\w+\.\w|\w\.\w+\(|\w\.[A-Z]\b|\w\[[^\]]*\]")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def shares_run(hint: str, solution: str, length: int = 4) -> str | None:
    """The first run of ``length`` consecutive hint tokens that also occurs in the solution."""
    solution_tokens = tokens(solution)
    runs = {tuple(solution_tokens[i:i + length]) for i in range(len(solution_tokens) - length + 1)}
    hint_tokens = tokens(hint)
    for i in range(len(hint_tokens) - length + 1):
        if tuple(hint_tokens[i:i + length]) in runs:
            return " ".join(hint_tokens[i:i + length])
    return None


def hint_problems(hint: str, solution: str) -> list[str]:
    problems = []
    run = shares_run(hint, solution)
    if run:
        problems.append(f"shares {run!r} with the solution")
    for pattern, what in ((FORMULA, "a formula"), (CODE, "code")):
        prose = re.sub(r"<\|?/?\w+\|?>", "TAG", hint.replace("(IA)^3", "IA3").replace("e.g.", "eg"))
        prose = re.sub(r"(?<=[A-Za-z0-9])[-/](?=[A-Za-z])", " ", prose)  # key/value, 4-bit: words
        found = pattern.search(prose)
        if found:
            problems.append(f"holds {what} ({found.group(0)!r})")
    return problems


def hints_and_solutions(path) -> list[tuple[str, str, str]]:
    """``(where, hint, solution)`` for every ``# Hint:`` line and every graded question's hint."""
    notebook = json.loads(path.read_text())
    found, solutions = [], {}
    for index, cell in enumerate(notebook["cells"]):
        lines = cell_text(cell).split("\n")
        for i, line in enumerate(lines):
            if line.strip().startswith(BEGIN_SOLUTION):
                stop = next(j for j in range(i, len(lines)) if lines[j].strip().startswith(END_SOLUTION))
                solution = "\n".join(lines[i + 1:stop])
                hint = lines[i - 1].strip().removeprefix(HINT_MARK)
                name = cell["metadata"].get("nbgrader", {}).get("grade_id", "").removesuffix("_solution")
                solutions[name] = solution
                found.append((f"{path.stem} cell {index}", hint, solution))
    for _, meta in graded_cells(notebook):
        # a question's grade id is q<N>_<function name>
        solution = solutions.get(meta["grade_id"].split("_", 1)[1], "\n".join(solutions.values()))
        found.append((f"{path.stem} {meta['grade_id']}", meta.get("hint", ""), solution))
    return found


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_no_hint_restates_its_answer(solution):
    problems = [f"{where}: hint {hint!r} {', '.join(problems)}"
                for where, hint, answer in hints_and_solutions(solution)
                for problems in [hint_problems(hint, answer)] if problems]
    assert problems == []


@pytest.mark.parametrize("hint, solution", [
    (" base output plus x A^T B^T times alpha / r", "return x @ W.T + b + (x @ A.T @ B.T) * (alpha / r)"),
    (" torch.nn.functional.logsigmoid is stable where log(sigmoid(x)) is not",
     "return -F.logsigmoid(chosen - rejected).mean()"),
    (" index each row at (number of ones in its mask) - 1", "last = attention_mask.long().sum(dim=1) - 1"),
    (" compare with chosen_rewards > rejected_rewards", "(chosen_rewards > rejected_rewards).float().mean()"),
])
def test_the_hint_check_catches_hints_that_give_the_answer(hint, solution):
    """Hints this course once had (or could have): each is caught, by shared tokens or a formula."""
    assert hint_problems(hint, solution)


def test_every_lesson_has_a_reasoning_question_and_is_named_in_a_header():
    named: dict[str, set[str]] = {}
    questions: dict[str, set[str]] = {}
    for path in SOLUTIONS:
        notebook = json.loads(path.read_text())
        header = cell_text(notebook["cells"][0])
        match = re.search(r"\*\*Lessons\*\*: ([^\n]*)", header)
        if path.stem != "ex00_warmup":
            assert match, f"{path.stem}: its header names no lessons"
            for lesson in re.findall(r"\b(\d\d)\b", match.group(1)):
                named.setdefault(lesson, set()).add(path.stem)
        questions[path.stem] = {meta["grade_id"] for _, meta in graded_cells(notebook)}
    for lesson, entries in REASONING.items():
        for exercise, question in entries:
            assert question in questions[exercise], (lesson, exercise, question)
            assert exercise in named.get(lesson, set()), f"{exercise}'s header does not name lesson {lesson}"
    assert sorted(REASONING) == [f"{n:02d}" for n in range(1, 12)]


def test_points_in_every_header_add_up():
    """The header's point total and each question's title agree with the graded cells."""
    for path in SOLUTIONS:
        notebook = json.loads(path.read_text())
        points = [meta["points"] for _, meta in graded_cells(notebook)]
        header = cell_text(notebook["cells"][0])
        titles = [int(n) for cell in notebook["cells"] if cell["cell_type"] == "markdown"
                  for n in re.findall(r"^## Question \d+ \((\d+) points?\)", cell_text(cell), re.M)]
        assert titles == points, path.stem
        total = re.search(r"= (\d+)\.", header)
        if total:
            assert int(total.group(1)) == sum(points), path.stem
