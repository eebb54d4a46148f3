"""The code a lesson teaches is written in its cells; where the package needs the same code, the
cell and the package hold the same text (one source, checked here), and no lesson prints code
with ``inspect.getsource`` (invisible wherever outputs are not shown)."""

from __future__ import annotations

import ast
import inspect
import json
import re

import pytest

from course_utils import dpo, nf4, peft_scratch, ppo, reward_modeling, rollouts
from course_utils.course.paths import NOTEBOOKS_DIR

TAUGHT_IN_CELLS = [
    ("02_peft_and_adapters", peft_scratch.BottleneckAdapter),
    ("04_lora", peft_scratch.LoRALinear),
    ("05_ia3", peft_scratch.IA3Linear),
    *[("06_nf4_quantization", f) for f in (
        nf4.nf4_offset, nf4.build_nf4_code, nf4.block_absmax, nf4.nearest_code,
        nf4.quantize_blockwise_codebook, nf4.pack_nibbles, nf4.quantize_nf4, nf4.unpack_nibbles,
        nf4.dequantize_blockwise_codebook, nf4.dequantize_nf4)],
    ("08_reward_modeling", reward_modeling.bradley_terry_loss),
    ("09_ppo_rlhf", ppo.masked_mean),
    ("09_ppo_rlhf", ppo.ppo_policy_loss),
    ("09_ppo_rlhf", ppo.kl_shaped_rewards),
    ("09_ppo_rlhf", ppo.gae),
    ("09_ppo_rlhf", ppo.ppo_step),
    ("09_ppo_rlhf", rollouts.best_of_n_kl),
    ("09_ppo_rlhf", rollouts.best_of_n_expectation),
    ("10_dpo", dpo.sequence_logprobs),
    ("10_dpo", dpo.dpo_loss),
]


def code_cells(stem: str) -> list[str]:
    cells = json.loads((NOTEBOOKS_DIR / f"{stem}.ipynb").read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def definition_in_cells(stem: str, name: str) -> str:
    found = [ast.get_source_segment(source, node) for source in code_cells(stem)
             for node in ast.parse(source).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name]
    assert len(found) == 1, f"{stem} defines {name} in {len(found)} cells, expected 1"
    return found[0]


@pytest.mark.parametrize("stem, obj", TAUGHT_IN_CELLS, ids=lambda v: getattr(v, "__name__", v))
def test_the_cell_and_the_package_hold_the_same_code(stem, obj):
    assert definition_in_cells(stem, obj.__name__) == inspect.getsource(obj).rstrip("\n")


def test_no_lesson_prints_code_with_getsource():
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        assert not any("getsource" in source for source in code_cells(path.stem)), path.name


def test_no_cell_imports_course_utils_for_a_side_effect():
    """The notices are hidden by a call a learner sees (the set-up cell's ``set_up_notebook``),
    and every lesson imports from course_utils only what its cells use."""
    bare = re.compile(r"(?m)^\s*import course_utils\b")
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        for source in code_cells(path.stem):
            assert not bare.search(source), f"{path.name}: a bare `import course_utils`"
        assert "set_up_notebook(" in code_cells(path.stem)[0], f"{path.name}: no set-up cell first"


def test_the_known_library_notices_are_dropped_and_nothing_else(caplog):
    import logging

    import course_utils

    course_utils.hide_library_notices()
    course_utils.hide_library_notices()  # twice, as a notebook run twice does: one filter each
    for name, prefix in course_utils.KNOWN_NOTICES.items():
        assert len(logging.getLogger(name).filters) == 1
        logger = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning(prefix + " from kernels-community: No module named 'kernels'.")
            logger.warning("another message from the same logger")
        assert [r.getMessage() for r in caplog.records] == ["another message from the same logger"]
        caplog.clear()


def test_peft_on_the_course_model_shows_no_deprecation_warning():
    """peft reads model.is_gradient_checkpointing, which transformers 5 deprecated; course_utils
    silences exactly that message (run in a fresh interpreter, where warnings are not yet seen)."""
    import subprocess
    import sys

    script = ("import warnings; warnings.simplefilter('default')\n"
              "import course_utils; course_utils.hide_library_notices()\n"
              "from peft import LoraConfig, get_peft_model\n"
              "from course_utils.course.models import load_model_and_tokenizer\n"
              "from course_utils.course.profiles import tiny_profile\n"
              "model, _ = load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)\n"
              "get_peft_model(model, LoraConfig(r=2, target_modules=['q_proj'], task_type='CAUSAL_LM'))\n"
              "warnings.warn('a warning that must still show', FutureWarning)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is_gradient_checkpointing" not in result.stderr
    assert "a warning that must still show" in result.stderr


def test_the_course_uses_transformers_5_names_for_activation_checkpointing():
    """The silenced deprecation covers the libraries' calls only: the course's own code, cells and
    recipes use the new names."""
    from course_utils.course.paths import REPO_ROOT

    old = re.compile(r"\.gradient_checkpointing_(enable|disable)\(|is_gradient_checkpointing\b|"
                     r"\bgradient_checkpointing(_kwargs)?\s*[=:]")
    texts = {path.name: "\n".join(code_cells(path.stem)) for path in NOTEBOOKS_DIR.glob("*.ipynb")}
    texts.update({str(path.relative_to(REPO_ROOT)): path.read_text()
                  for pattern in ("course_utils/*.py", "scripts/*.py", "configs/recipes/*/*.yaml")
                  for path in REPO_ROOT.glob(pattern) if path.name != "__init__.py"})
    assert not [name for name, text in texts.items() if old.search(text)]


def test_only_the_reward_head_swap_report_is_hidden(caplog):
    """transformers' load report for a reward model made from a language model (the LM head
    dropped, the score head new) is hidden; a report naming any other key still shows."""
    import logging

    import course_utils

    course_utils.hide_library_notices()
    logger = logging.getLogger(course_utils.LOAD_REPORT_LOGGER)
    table = ("LlamaForSequenceClassification LOAD REPORT from: sft\nKey            | Status     | \n"
             "---------------+------------+-\n{rows}\nNotes:\n- MISSING:\tnewly initialized")
    head_swap = "lm_head.weight | UNEXPECTED | \nscore.weight   | MISSING    | "
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(table.format(rows=head_swap))
        logger.warning(table.format(rows=head_swap + "\nmodel.norm.weight | MISSING | "))
        logger.warning(table.format(rows="score.weight   | MISSING    | "))
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2 and "model.norm.weight" in shown[0] and "lm_head" not in shown[1]
