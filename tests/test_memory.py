"""Parameter counters against the real thing: meta-device models, peft, and published numbers."""

from __future__ import annotations

import pytest
import torch

from course_utils import memory
from course_utils.course.models import tinyllama_config
from course_utils.course.paths import COURSE_MODEL_DIR


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


# ---------------------------------------------------------------------------------------------
# The calculator against measured bytes, and against the literature


@pytest.fixture(scope="module")
def course_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR)


def test_parameter_numels_follow_the_model(course_model):
    assert memory.parameter_numels(course_model.config) == [
        p.numel() for p in course_model.parameters()]
    config = odd_config()
    assert memory.parameter_numels(config) == [p.numel() for p in meta_model(config).parameters()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum", "adamw_8bit", "sgd"])
def test_static_memory_matches_measured_bytes_after_a_real_step(optimizer):
    import copy

    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR)
    model.train()
    make = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-4),
            "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9),
            "sgd": lambda p: torch.optim.SGD(p, lr=1e-4),
            "adamw_8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-4)}[optimizer]
    opt = make(model.parameters())
    batch = torch.randint(3, 1000, (2, 32))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    measured = memory.measured_static_bytes(model, opt)
    config = copy.deepcopy(model.config)
    numels = memory.parameter_numels(config)
    predicted = memory.training_memory(sum(numels), optimizer=optimizer,
                                       trainable_tensor_numels=numels)
    assert measured == {"weights": predicted.weights, "gradients": predicted.gradients,
                        "optimizer_states": predicted.optimizer_states}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch_size, seq_len", [(4, 64), (2, 128)])
def test_activation_estimate_matches_saved_tensors(course_model, checkpointing, batch_size,
                                                   seq_len):
    course_model.train()
    if checkpointing:
        course_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        course_model.activation_checkpointing_disable()
    batch = torch.randint(3, 1000, (batch_size, seq_len))
    measured = memory.measured_activation_bytes(course_model, input_ids=batch, labels=batch)
    predicted = memory.activation_bytes(course_model.config, batch_size, seq_len,
                                        activation_checkpointing=checkpointing)
    course_model.activation_checkpointing_disable()
    assert predicted == pytest.approx(measured, rel=0.02)


def test_the_100b_example_and_zero_16_bytes():
    # fp16 weights + fp16 gradients + fp32 Adam moments: 12 bytes, 1200 GB for 100B parameters
    estimate = memory.training_memory(100 * 10**9, weight_bytes=2, gradient_bytes=2)
    assert estimate.total == 1200 * memory.GB
    # ZeRO's mixed-precision Adam adds the fp32 master copy: 16 bytes per parameter
    assert memory.training_memory(1, weight_bytes=2, gradient_bytes=2,
                                  master_weight_bytes=4).total == 16


@pytest.mark.parametrize("stage, expected_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_stages_reproduce_the_zero_paper_figure_1(stage, expected_gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, K = 12
    estimate = memory.training_memory(7_500_000_000, weight_bytes=2, gradient_bytes=2,
                                      master_weight_bytes=4, zero_stage=stage, n_gpus=64)
    assert estimate.total / memory.GB == pytest.approx(expected_gb, abs=0.05)


def test_nf4_storage_bits():
    assert memory.nf4_bits_per_parameter(double_quant=False) == 4.5
    assert memory.nf4_bits_per_parameter() == pytest.approx(4.127, abs=5e-4)


def test_bad_calculator_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown optimizer"):
        memory.optimizer_state_bytes([10], "adam9")
    with pytest.raises(ValueError, match="zero_stage"):
        memory.training_memory(10, zero_stage=4)
    with pytest.raises(ValueError, match="add up"):
        memory.training_memory(10, trainable_tensor_numels=[3, 4])
