"""Lesson 03's prefix tuning against peft: the parameter formula for the prefix and its
reparameterisation MLP (``peft_scratch.prefix_tuning_parameters``, written in the lesson's cell)
against peft's own count on small random Llamas, and what peft does with activation checkpointing
(the lesson explains both outcomes)."""

from __future__ import annotations

import ast
import copy
import inspect
import json

import pytest
import torch

from course_utils import peft_scratch
from course_utils.course.paths import NOTEBOOKS_DIR

LESSON = "03_prompt_prefix_ptuning"


def small_llama(hidden=64, heads=4, kv_heads=2, layers=3, head_dim=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, intermediate_size=2 * hidden, vocab_size=97,
                         max_position_embeddings=64, head_dim=head_dim)
    return LlamaForCausalLM(config).eval()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


SIZES = [  # hidden, query heads, key/value heads, layers, head dim, virtual tokens, MLP width
    (64, 4, 2, 3, None, 8, 32),
    (64, 4, 4, 2, None, 5, 64),      # no grouped-query attention: kv width = hidden
    (96, 6, 2, 4, None, 16, 96),     # the MLP as wide as the model (the course's recipe)
    (48, 4, 1, 1, 16, 3, 7),         # head_dim set apart from hidden / heads
    (192, 6, 2, 6, 32, 16, 192),     # the course model's shape and recipe: 161,728
]


@pytest.mark.parametrize("hidden, heads, kv_heads, layers, head_dim, n_virtual, encoder_hidden", SIZES)
def test_the_prefix_formula_matches_peft(hidden, heads, kv_heads, layers, head_dim, n_virtual,
                                         encoder_hidden):
    from peft import PrefixTuningConfig, get_peft_model

    base = small_llama(hidden, heads, kv_heads, layers, head_dim)
    kv_width = base.model.layers[0].self_attn.k_proj.out_features
    for projection, width, expected in [
        (True, encoder_hidden, peft_scratch.prefix_tuning_parameters(n_virtual, kv_width, layers,
                                                                     encoder_hidden)),
        # peft's default MLP width is the key/value width (its token_dim under grouped-query attention)
        (True, None, peft_scratch.prefix_tuning_parameters(n_virtual, kv_width, layers, kv_width)),
        (False, None, peft_scratch.prefix_tuning_parameters(n_virtual, kv_width, layers)),
    ]:
        model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n_virtual, prefix_projection=projection,
            encoder_hidden_size=width))
        assert trainable(model) == expected, (projection, width)


def test_the_course_models_recipe_gives_the_lessons_count():
    """The section and the results table of lesson 03 train the same configuration: the MLP as
    wide as the model (``peft_comparison.peft_config``), not peft's default (the key/value width)."""
    assert peft_scratch.prefix_tuning_parameters(16, 64, 6, 192) == 161_728
    assert peft_scratch.prefix_tuning_parameters(16, 64, 6, 64) == 55_104  # peft's default width
    assert peft_scratch.prefix_tuning_parameters(16, 64, 6) == 12_288


def test_the_lesson_cell_holds_the_package_formula():
    cells = json.loads((NOTEBOOKS_DIR / f"{LESSON}.ipynb").read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    found = [ast.get_source_segment(source, node) for source in sources for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name == "prefix_tuning_parameters"]
    assert found == [inspect.getsource(peft_scratch.prefix_tuning_parameters).rstrip("\n")]


def test_peft_refuses_prefix_tuning_on_a_checkpointed_model():
    """Checkpointing switched on before ``get_peft_model``: peft's own check raises."""
    from peft import PrefixTuningConfig, get_peft_model

    base = small_llama()
    base.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="PREFIX_TUNING does not work with gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_checkpointing_switched_on_afterwards_drops_the_prefix():
    """Switched on after ``get_peft_model`` (as a trainer does when training starts), peft does not
    check; transformers' checkpointed layers drop the cache that carries the prefix, and attention
    fails on an attention mask ``n_virtual`` positions longer than the keys."""
    from peft import PrefixTuningConfig, get_peft_model

    n_virtual, n_tokens = 4, 5
    model = get_peft_model(small_llama(), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                             num_virtual_tokens=n_virtual))
    model.activation_checkpointing_enable()
    model.train()
    ids = torch.arange(3, 3 + 2 * n_tokens).view(2, n_tokens)
    with pytest.raises(RuntimeError, match=rf"\({n_tokens}\).*\({n_virtual + n_tokens}\)"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
