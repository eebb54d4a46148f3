"""The code a lesson teaches is written in its cells; where the package needs the same code, the
cell and the package hold the same text (one source, checked here), and no lesson prints code
with ``inspect.getsource`` (invisible wherever outputs are not shown)."""

from __future__ import annotations

import ast
import inspect
import json

import pytest

from course_utils import nf4, peft_scratch, rlhf
from course_utils.paths import NOTEBOOKS_DIR

TAUGHT_IN_CELLS = [
    ("02_peft_and_adapters", peft_scratch.BottleneckAdapter),
    ("04_lora", peft_scratch.LoRALinear),
    ("05_ia3", peft_scratch.IA3Linear),
    *[("06_nf4_quantization", f) for f in (
        nf4.nf4_offset, nf4.build_nf4_code, nf4.block_absmax, nf4.nearest_code,
        nf4.quantize_blockwise_codebook, nf4.pack_nibbles, nf4.quantize_nf4, nf4.unpack_nibbles,
        nf4.dequantize_blockwise_codebook, nf4.dequantize_nf4)],
    ("08_reward_modeling", rlhf.bradley_terry_loss),
    ("09_ppo_rlhf", rlhf.masked_mean),
    ("09_ppo_rlhf", rlhf.ppo_policy_loss),
    ("09_ppo_rlhf", rlhf.kl_shaped_rewards),
    ("09_ppo_rlhf", rlhf.gae),
    ("09_ppo_rlhf", rlhf.ppo_step),
    ("10_dpo", rlhf.sequence_logprobs),
    ("10_dpo", rlhf.dpo_loss),
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
