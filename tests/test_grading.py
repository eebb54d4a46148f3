"""The grader can fail: full marks for solutions, zero for untouched exercises, and each wrong,
broken or cheating variant loses exactly the points of the questions it gets wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from course_utils import grade
from course_utils.exercises import EXERCISES_DIR, SOLUTIONS_DIR

SOLUTIONS = sorted(SOLUTIONS_DIR.glob("ex*.ipynb"))


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_every_solution_scores_full_marks(solution):
    results = grade.grade_notebook(solution)
    assert [(r.status, r.message) for r in results] == [("passed", "")] * len(results)
    assert sum(r.points for r in results) == sum(r.possible for r in results) > 0


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_every_untouched_exercise_scores_zero_and_the_grader_exits_0(solution, tmp_path,
                                                                     capsys):
    report = tmp_path / "grades.json"
    status = grade.main([str(EXERCISES_DIR / solution.name), "--json", str(report)])
    assert status == 0
    rows = json.loads(report.read_text())["results"]
    assert rows and all(r["points"] == 0 for r in rows)
    assert all("not answered yet" in r["message"] and r["hint"] for r in rows)
    assert "total" in capsys.readouterr().out


def replace_cell(notebook: dict, marker: str, source: str) -> None:
    """Replace the one code cell whose text contains ``marker`` with ``source``."""
    matches = [c for c in notebook["cells"]
               if c["cell_type"] == "code" and marker in "".join(c["source"])]
    assert len(matches) == 1, marker
    matches[0]["source"] = source.splitlines(keepends=True)


FORMAT_CHAT_NO_NEWLINE = '''
def format_chat(messages, add_generation_prompt=False):
    text = "".join(f"<|{m['role']}|>\\n{m['content']}</s>" for m in messages)
    return text + ("<|assistant|>\\n" if add_generation_prompt else "")
'''
FORMAT_CHAT_HARDCODED = '''
def format_chat(messages, add_generation_prompt=False):
    return ("<|system|>\\nYou are a helpful assistant.</s>\\n<|user|>\\nWhere does Odile live?</s>\\n"
            "<|assistant|>\\nOdile lives in Fenwick.</s>\\n")
'''
FORMAT_CHAT_HANGS = '''
def format_chat(messages, add_generation_prompt=False):
    while True:
        pass
'''
COUNT_NO_EOS = '''
def count_reply_tokens(tokenizer, messages):
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(full)["input_ids"]) - len(tokenizer(prompt)["input_ids"]) - 2
'''
COUNT_RAISES = '''
def count_reply_tokens(tokenizer, messages):
    return len(messages) / 0
'''
COUNT_WRONG_TYPE = '''
def count_reply_tokens(tokenizer, messages):
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return str(len(tokenizer(full)["input_ids"]) - len(tokenizer(prompt)["input_ids"]) - 1)
'''
COUNT_SYNTAX_ERROR = '''
def count_reply_tokens(tokenizer, messages)
    return 0
'''
LABELS_SHIFTED = '''
def reply_labels(tokenizer, messages):
    def n_tokens(partial, generation_prompt):
        text = tokenizer.apply_chat_template(partial, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return len(tokenizer(text)["input_ids"])
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, stop = n_tokens(messages[:i], True) - 1, n_tokens(messages[:i + 1], False) - 2
            labels[start:stop] = ids[start + 1:stop + 1]
    return labels
'''
LABELS_TRAIN_NEWLINE = LABELS_SHIFTED.replace(
    "start, stop = n_tokens(messages[:i], True) - 1, n_tokens(messages[:i + 1], False) - 2",
    "start, stop = n_tokens(messages[:i], True), n_tokens(messages[:i + 1], False)").replace(
    "ids[start + 1:stop + 1]", "ids[start:stop]")
LABELS_FLOOD = '''
def reply_labels(tokenizer, messages):
    print("debugging " * 100_000)
    return []
'''

# student -> (cell replacements, expected points per question)
FULL = {"q1_format_chat": 2, "q2_count_reply_tokens": 1, "q3_reply_labels": 2}
VARIANTS = {
    "correct": ({}, FULL),
    "q1_no_newline": ({"def format_chat": FORMAT_CHAT_NO_NEWLINE}, {**FULL, "q1_format_chat": 0}),
    "q1_hardcoded": ({"def format_chat": FORMAT_CHAT_HARDCODED}, {**FULL, "q1_format_chat": 0}),
    "q1_hangs": ({"def format_chat": FORMAT_CHAT_HANGS}, {**FULL, "q1_format_chat": 0}),
    "q2_forgets_eos": ({"def count_reply_tokens": COUNT_NO_EOS},
                       {**FULL, "q2_count_reply_tokens": 0}),
    "q2_raises": ({"def count_reply_tokens": COUNT_RAISES}, {**FULL, "q2_count_reply_tokens": 0}),
    "q2_wrong_type": ({"def count_reply_tokens": COUNT_WRONG_TYPE},
                      {**FULL, "q2_count_reply_tokens": 0}),
    "q2_syntax_error": ({"def count_reply_tokens": COUNT_SYNTAX_ERROR},
                        {**FULL, "q2_count_reply_tokens": 0}),
    "q3_shifted": ({"def reply_labels": LABELS_SHIFTED}, {**FULL, "q3_reply_labels": 0}),
    "q3_trains_newline": ({"def reply_labels": LABELS_TRAIN_NEWLINE},
                          {**FULL, "q3_reply_labels": 0}),
    "q3_floods": ({"def reply_labels": LABELS_FLOOD}, {**FULL, "q3_reply_labels": 0}),
    # visible tests edited to pass, with a wrong q2: the grader uses the source's tests
    "tampered_tests": ({"def count_reply_tokens": COUNT_NO_EOS,
                        "check_equal(result, reference_reply_tokens": "pass"},
                       {**FULL, "q2_count_reply_tokens": 0}),
}
EXPECTED_STATUS = {"q1_hangs": "timeout", "q2_raises": "error", "q2_wrong_type": "failed",
                   "q3_floods": "error", "q1_hardcoded": "failed", "q2_syntax_error": "error"}
EXPECTED_MESSAGE = {"q1_hangs": "timed out", "q2_raises": "ZeroDivisionError",
                    "q2_wrong_type": "should be int, got str", "q3_floods": "OutputFloodError",
                    "q1_hardcoded": "hidden conversation",
                    "q2_syntax_error": "an earlier cell failed: SyntaxError"}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """A class folder, one student per variant of ex00, graded in one grader run."""
    root = tmp_path_factory.mktemp("submissions")
    source = json.loads((SOLUTIONS_DIR / "ex00_warmup.ipynb").read_text())
    for student, (replacements, _) in VARIANTS.items():
        notebook = json.loads(json.dumps(source))
        for marker, code in replacements.items():
            replace_cell(notebook, marker, code)
        folder = root / student
        folder.mkdir()
        (folder / "ex00_warmup.ipynb").write_text(json.dumps(notebook))
    report = root.parent / "grades.json"
    status = grade.main([str(root), "--json", str(report), "--timeout", "20"])
    return status, json.loads(report.read_text())


def test_class_grading_exits_0_with_one_row_per_student_and_question(graded_class):
    status, report = graded_class
    assert status == 0 and report["problems"] == []
    rows = {(r["student"], r["question"]) for r in report["results"]}
    assert rows == {(s, q) for s in VARIANTS for q in FULL}
    assert len(report["results"]) == len(rows)


@pytest.mark.parametrize("student", VARIANTS)
def test_each_variant_loses_exactly_the_points_it_should(graded_class, student):
    _, report = graded_class
    rows = {r["question"]: r for r in report["results"] if r["student"] == student}
    assert {q: r["points"] for q, r in rows.items()} == VARIANTS[student][1]
    for row in rows.values():
        if row["points"] == row["possible"]:
            assert row["status"] == "passed" and not row["hint"]
        else:
            assert row["hint"] and "\n" not in row["message"] and len(row["message"]) <= 160
            if student in EXPECTED_STATUS:
                assert row["status"] == EXPECTED_STATUS[student]
                assert EXPECTED_MESSAGE[student] in row["message"]


def test_missing_file_is_a_grader_problem(tmp_path, capsys):
    assert grade.main([str(tmp_path / "nope.ipynb")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_file_that_is_not_a_notebook_is_a_grader_problem(tmp_path, capsys):
    bad = tmp_path / "ex00_warmup.ipynb"
    bad.write_text("this is not json")
    assert grade.main([str(bad)]) == 2
    assert "not a Jupyter notebook" in capsys.readouterr().err


def test_an_unknown_exercise_is_a_grader_problem(tmp_path, capsys):
    notebook = tmp_path / "homework.ipynb"
    shutil.copy(EXERCISES_DIR / "ex00_warmup.ipynb", notebook)
    data = json.loads(notebook.read_text())
    data["metadata"]["course"]["exercise"] = "ex77_missing"
    notebook.write_text(json.dumps(data))
    assert grade.main([str(notebook)]) == 2
    assert "no solution source" in capsys.readouterr().err


def test_exercise_is_recognised_by_file_name_when_metadata_is_gone():
    assert grade.exercise_name(grade.Path("ex00_warmup (1).ipynb"), {}) == "ex00_warmup"
    assert grade.exercise_name(grade.Path("x/ex00_warmup.ipynb"), {"metadata": {}}) == "ex00_warmup"
    with pytest.raises(grade.GraderError, match="cannot tell which exercise"):
        grade.exercise_name(grade.Path("homework.ipynb"), {})
