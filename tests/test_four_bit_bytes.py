"""The course's count of a 4-bit model's bytes, against the tensors bitsandbytes actually stores.

Lessons 01 and 06 take a 4-bit model's size from ``budget.model_bytes("nf4")``: the decoder
layers' linear weights in NF4 with double quantization (``memory.nf4_bits_per_parameter()``, 4.127
bits per weight), everything else (embeddings, LM head, norms) in 16 bits, since
``BitsAndBytesConfig(load_in_4bit=True)`` quantizes only the layers' ``nn.Linear`` modules. Here
small Llama models are loaded that way on the CPU and their bytes added up as bitsandbytes keeps
them: ``get_memory_footprint()`` (parameters and buffers, a 4-bit weight as its packed uint8 bytes)
plus each 4-bit layer's quantization state (absmax, second-level absmax, offset, code tables).

The lessons once counted every parameter at 4.127 bits, embeddings and LM head included
(TinyLlama: 0.567 GB instead of 0.762 GB). ``all_parameters_at_4_bits`` keeps that formula as the
wrong answer the comparison must reject.
"""

from __future__ import annotations

import pytest
import torch

from course_utils import budget, memory
from course_utils.course.models import tinyllama_config
from course_utils.course.paths import COURSE_MODEL_DIR

#: Per 4-bit tensor, stored but not per weight: NF4's 16-entry code table, the second level's
#: 256-entry dynamic code table and the offset, fp32 each. The per-weight formula leaves them out.
TABLE_BYTES_PER_TENSOR = (16 + 256 + 1) * 4
#: the second level keeps one fp32 absmax per 256 first-level blocks, the last group rounded up
ROUNDING_BYTES_PER_TENSOR = 4


def all_parameters_at_4_bits(config) -> float:
    """The old, wrong count: every parameter at NF4's 4.127 bits."""
    return memory.count_parameters(config) * memory.nf4_bits_per_parameter() / 8


def small_llama_with_tinyllamas_vocabulary(directory):
    """Three layers with grouped-query attention and TinyLlama's 32,000-token vocabulary, so that
    the 16-bit embeddings and LM head weigh as much as they do in a small real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(directory)
    return directory


MODELS = {"small Llama, TinyLlama's vocabulary": small_llama_with_tinyllamas_vocabulary,
          "the course model": lambda directory: COURSE_MODEL_DIR}


def load_in_4bit(path):
    """As QLoRA loads a model (lesson 07's colab recipe): NF4, double quantization, 16-bit rest."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float16,
                                                device_map="cpu")


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def stored_bytes(model) -> dict[str, int]:
    """What bitsandbytes keeps, part by part, and the total as ``get_memory_footprint`` plus the
    quantization states (which the footprint does not see: they are not parameters)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    four_bit = {id(m.weight) for m in layers}
    state = 0
    for layer in layers:
        quant_state = layer.weight.quant_state
        assert quant_state.nested, "double quantization: the absmax are stored in 8 bits"
        state += nbytes(quant_state.absmax) + nbytes(quant_state.state2.absmax)
    tables = sum(nbytes(t) for layer in layers for t in (
        layer.weight.quant_state.code, layer.weight.quant_state.offset, layer.weight.quant_state.state2.code))
    parts = {
        "4-bit layers": len(layers),
        "packed 4-bit weights": sum(nbytes(m.weight) for m in layers),
        "absmax": state,
        "code tables and offsets": tables,
        "16-bit parameters": sum(nbytes(p) for p in model.parameters() if id(p) not in four_bit),
        "buffers": sum(nbytes(b) for b in model.buffers()),
    }
    parts["total"] = model.get_memory_footprint() + state + tables
    assert parts["total"] == sum(v for k, v in parts.items() if k not in ("4-bit layers", "total"))
    return parts


@pytest.fixture(scope="module", params=list(MODELS))
def quantized(request, tmp_path_factory):
    path = MODELS[request.param](tmp_path_factory.mktemp("model"))
    model = load_in_4bit(path)
    return model.config, stored_bytes(model)


def test_only_the_layers_linear_weights_are_4_bit(quantized):
    config, stored = quantized
    assert stored["4-bit layers"] == config.num_hidden_layers * len(memory.linear_shapes(config))
    assert stored["packed 4-bit weights"] == memory.linear_layer_parameters(config) / 2
    sixteen_bit = memory.count_parameters(config) - memory.linear_layer_parameters(config)
    assert stored["16-bit parameters"] == 2 * sixteen_bit  # embeddings, LM head, norms


def test_the_course_count_is_what_bitsandbytes_stores(quantized):
    config, stored = quantized
    course = budget.model_bytes("nf4", config)
    # the per-weight formula leaves out only each 4-bit tensor's tables and the rotary buffers
    unexplained = stored["total"] - course - stored["code tables and offsets"] - stored["buffers"]
    assert abs(unexplained) <= ROUNDING_BYTES_PER_TENSOR * stored["4-bit layers"]
    assert stored["code tables and offsets"] == TABLE_BYTES_PER_TENSOR * stored["4-bit layers"]
    # and the 4-bit part alone: 4 bits + 8/64 + 32/(64 x 256) per weight
    four_bit = stored["packed 4-bit weights"] + stored["absmax"]
    assert abs(four_bit - memory.linear_layer_parameters(config) * memory.nf4_bits_per_parameter() / 8
               ) <= ROUNDING_BYTES_PER_TENSOR * stored["4-bit layers"]


def test_counting_every_parameter_at_4_bits_is_rejected(quantized):
    config, stored = quantized
    per_tensor = TABLE_BYTES_PER_TENSOR + ROUNDING_BYTES_PER_TENSOR
    tolerance = per_tensor * stored["4-bit layers"] + stored["buffers"]
    assert abs(stored["total"] - budget.model_bytes("nf4", config)) <= tolerance
    wrong = all_parameters_at_4_bits(config)
    assert abs(stored["total"] - wrong) > 5 * tolerance
    assert wrong < 0.9 * stored["total"]  # the embeddings and LM head are counted 4 times too small


def test_tinyllama_in_4_bits_is_about_0_76_gb_not_0_567():
    config = tinyllama_config()
    assert round(budget.model_bytes("nf4", config) / memory.GB, 2) == 0.76
    assert round(all_parameters_at_4_bits(config) / memory.GB, 3) == 0.567
