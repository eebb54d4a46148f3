"""Parameter counters against the real thing: meta-device models, peft, and published numbers."""

from __future__ import annotations

import pytest
import torch

from course_utils import memory
from course_utils.models import tinyllama_config
from course_utils.paths import COURSE_MODEL_DIR


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def odd_config():
    """Tied embeddings, biases everywhere, an explicit head_dim: every branch of the counter."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


def course_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(COURSE_MODEL_DIR)


CONFIGS = {"course model": course_config, "TinyLlama-1.1B": tinyllama_config,
           "Llama-2-7B": llama2_7b_config, "tied, biased, head_dim": odd_config}


def meta_model(config):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_count_parameters_matches_the_model_built_on_meta(name):
    config = CONFIGS[name]()
    model = meta_model(config)
    assert memory.count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_published_counts():
    # TinyLlama-1.1B and Llama-2-7B, as their released checkpoints report them
    assert memory.count_parameters(tinyllama_config()) == 1_100_048_384
    assert memory.count_parameters(llama2_7b_config()) == 6_738_415_616


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("r, targets", [(8, ["q_proj", "v_proj"]), (4, ["k_proj", "down_proj"]),
                                        (2, list(memory.LORA_TARGETS))])
def test_lora_parameters_match_peft(name, r, targets):
    from peft import LoraConfig, get_peft_model

    config = CONFIGS[name]()
    model = get_peft_model(meta_model(config), LoraConfig(r=r, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_parameters(config, r, targets) == trainable


def test_the_well_known_peft_printout_for_llama2_7b():
    # "trainable params: 4,194,304 || all params: 6,742,609,920" (LoRA r=8 on q_proj, v_proj)
    config = llama2_7b_config()
    lora = memory.lora_parameters(config, 8, ["q_proj", "v_proj"])
    assert lora == 4_194_304
    assert memory.count_parameters(config) + lora == 6_742_609_920


def test_bad_lora_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown target modules"):
        memory.lora_parameters(tinyllama_config(), 8, ["query"])
    with pytest.raises(ValueError, match="positive integer"):
        memory.lora_parameters(tinyllama_config(), 0, ["q_proj"])
