"""Submissions that attack the grading itself score 0 on what they attack (issue 23).

Each student below answers one question wrongly *and* tampers with something the old in-kernel
checks relied on: the check helpers, ``torch``'s and ``math``'s comparisons, builtins, tensor
methods, the process itself (exits), the grader's output, the solutions on disk, or the hidden
test's own reference code. The verdicts come from the judge, which runs none of it.
"""

from __future__ import annotations

import json

import pytest
from test_grading import DPO_REFERENCE_SWAPPED

from course_utils.grading import grade
from course_utils.grading.make_exercises import SOLUTIONS_DIR
from course_utils.grading.sandbox import landlock_abi

WRONG_DPO = DPO_REFERENCE_SWAPPED  # a wrong answer of tests/test_grading.py
READS_SOLUTION = '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    import json
    from course_utils.grading.make_exercises import SOLUTIONS_DIR
    notebook = json.loads((SOLUTIONS_DIR / "ex08_dpo.ipynb").read_text())
    source = next("".join(c["source"]) for c in notebook["cells"]
                  if "def dpo_loss" in "".join(c["source"]) and "BEGIN SOLUTION" in "".join(c["source"]))
    namespace = {"torch": torch}
    exec(source, namespace)
    return namespace["dpo_loss"](policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
'''
USES_TEST_REFERENCE = '''
def sequence_logprob(logits, input_ids, completion_mask):
    return globals()["reference_sequence_logprob"](logits, input_ids, completion_mask)
'''
FULL_08 = {"q1_sequence_logprob": 2, "q2_dpo_loss": 2, "q3_preference_accuracy": 1, "q4_diagnose_dpo": 2}
NO_Q2 = {**FULL_08, "q2_dpo_loss": 0}
# student -> (exercise, {cell marker: new source}, expected points)
TAMPERING = {
    "check_helpers_replaced_in_globals": ("ex08_dpo", {"def dpo_loss": (
        'globals()["check_close"] = lambda *a, **k: 0.0\n'
        'globals()["check_type"] = lambda *a, **k: None\n' + WRONG_DPO)}, NO_Q2),
    "checks_module_patched": ("ex08_dpo", {"def dpo_loss": (
        "import course_utils.grading.checks\nimport course_utils.numerics\n"
        "course_utils.grading.checks.check_close = course_utils.numerics.check_close = lambda *a, **k: 0.0\n"
        + WRONG_DPO)}, NO_Q2),
    "torch_and_math_comparisons_patched": ("ex08_dpo", {"def dpo_loss": (
        "import math\ntorch.allclose = torch.isclose = lambda *a, **k: True\n"
        "torch.testing.assert_close = lambda *a, **k: None\nmath.isclose = lambda *a, **k: True\n"
        + WRONG_DPO)}, NO_Q2),
    "tensor_methods_patched": ("ex08_dpo", {"def dpo_loss": (
        "torch.Tensor.allclose = lambda *a, **k: True\n"
        "torch.Tensor.abs = lambda self: torch.zeros_like(self)\n" + WRONG_DPO)}, NO_Q2),
    "builtins_abs_and_print_patched": ("ex08_dpo", {"def dpo_loss": (
        "import builtins\nbuiltins.abs = lambda value: 0\nbuiltins.print = lambda *a, **k: None\n"
        + WRONG_DPO)}, NO_Q2),
    # isinstance answering True breaks the kernel's own replies too: every later call is lost
    "builtins_isinstance_patched": ("ex08_dpo", {"def dpo_loss": WRONG_DPO.replace(
        "    return loss,",
        "    import builtins\n    builtins.isinstance = lambda *a: True\n    return loss,")},
        {"q1_sequence_logprob": 2, "q2_dpo_loss": 0, "q3_preference_accuracy": 0, "q4_diagnose_dpo": 0}),
    "prints_fake_passed_lines": ("ex08_dpo", {"def dpo_loss": WRONG_DPO.replace(
        "    return loss,", '    print("question 2: the visible check passed")\n'
        '    print("  q2_dpo_loss   2 / 2   passed")\n    return loss,')}, NO_Q2),
    "sys_exit_in_the_function": ("ex08_dpo", {"def dpo_loss": WRONG_DPO.replace(
        "    return loss,", "    import sys\n    sys.exit(0)\n    return loss,")}, NO_Q2),
    "os_exit_in_the_function": ("ex08_dpo", {"def dpo_loss": WRONG_DPO.replace(
        "    return loss,", "    import os\n    os._exit(0)\n    return loss,")}, NO_Q2),
    "reads_the_solution_from_disk": ("ex08_dpo", {"def dpo_loss": READS_SOLUTION}, NO_Q2),
    "calls_the_hidden_tests_reference": ("ex08_dpo", {"def sequence_logprob": USES_TEST_REFERENCE},
                                         {**FULL_08, "q1_sequence_logprob": 0}),
    # the second report: allclose patched and the Bradley-Terry loss's sign left out
    "allclose_patched_wrong_bradley_terry": ("ex06_reward_model", {"def bradley_terry_loss": (
        "torch.allclose = lambda *a, **k: True\n"
        "def bradley_terry_loss(chosen_rewards, rejected_rewards):\n"
        "    return (chosen_rewards - rejected_rewards).mean()\n")},
        {"q1_bradley_terry_loss": 0, "q2_pairwise_accuracy": 1, "q3_last_token_scores": 2,
         "q4_calibration_verdicts": 2}),
}


def replace_cell(notebook: dict, marker: str, source: str) -> None:
    matches = [c for c in notebook["cells"]
               if c["cell_type"] == "code" and marker in "".join(c["source"])
               and "grade_id" not in c.get("metadata", {}).get("course", {})]
    assert len(matches) == 1, marker
    matches[0]["source"] = source.splitlines(keepends=True)


@pytest.fixture(scope="module")
def tampered_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("tampering")
    for student, (exercise, replacements, _) in TAMPERING.items():
        notebook = json.loads((SOLUTIONS_DIR / f"{exercise}.ipynb").read_text())
        for marker, code in replacements.items():
            replace_cell(notebook, marker, code)
        (root / student).mkdir()
        (root / student / f"{exercise}.ipynb").write_text(json.dumps(notebook))
    report = root.parent / "tampering.json"
    status = grade.main([str(root), "--json", str(report), "--timeout", "15", "--seed", "11",
                         "--jobs", "2"])
    return status, json.loads(report.read_text())


@pytest.mark.parametrize("student", TAMPERING)
def test_tampering_scores_zero_on_what_it_tampers_with(tampered_class, student):
    if student == "reads_the_solution_from_disk" and landlock_abi() < 1:
        pytest.skip("this OS cannot keep the kernel from reading solutions/ (no Landlock)")
    status, report = tampered_class
    assert status == 0 and report["problems"] == []
    rows = {r["question"]: r for r in report["results"] if r["student"] == student}
    assert {q: r["points"] for q, r in rows.items()} == TAMPERING[student][2]
    for row in rows.values():
        if row["points"] == 0:  # a failed question, never a grader error
            assert row["status"] in ("failed", "error", "timeout") and row["hint"]


def test_the_kernel_never_sees_test_code_or_the_seed():
    """What the student's kernel runs: its own cells and the guard, nothing from a test cell."""
    notebook = json.loads((SOLUTIONS_DIR / "ex08_dpo.ipynb").read_text())
    kernel_notebook = grade.grading_notebook(notebook, notebook, 1000)
    source = "\n".join(cell.source for cell in kernel_notebook.cells)
    assert "reference_sequence_logprob" not in source and "HIDDEN TESTS" not in source
    assert "grader_rng()" not in source and "COURSE_GRADER_SEED" not in source
