"""Model loading: the course model, 4-bit NF4 on the CPU, the Hub code path, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from course_utils.course import models
from course_utils.course.chat import render_chat
from course_utils.course.paths import COURSE_MODEL_DIR
from course_utils.course.profiles import tiny_profile


def test_course_model_has_tinyllama_architecture(course_model_and_tokenizer):
    model, tokenizer = course_model_and_tokenizer
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    layer = model.model.layers[0]
    assert [n for n, _ in layer.self_attn.named_children()] == ["q_proj", "k_proj", "v_proj",
                                                                "o_proj"]
    assert [n for n, _ in layer.mlp.named_children()] == ["gate_proj", "up_proj", "down_proj",
                                                          "act_fn"]
    head_dim = config.hidden_size // config.num_attention_heads
    assert layer.self_attn.k_proj.out_features == config.num_key_value_heads * head_dim
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.pad_token == "</s>"
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000


def test_tinyllama_config_counts_the_published_parameters():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(models.tinyllama_config())
    # 1,100,048,384: TinyLlama-1.1B's parameter count, from its released safetensors.
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384


def test_4bit_loading_quantizes_the_linear_layers_on_cpu(course_model_and_tokenizer):
    import bitsandbytes as bnb

    full_model, tokenizer = course_model_and_tokenizer
    model, _ = models.load_model_and_tokenizer(tiny_profile(), load_in_4bit=True)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert "lm_head" not in quantized
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    batch = tokenizer(["Odile lives in", "Bramwell works as a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        quantized_logits = model(**batch).logits
        full_logits = full_model(**batch).logits
    agreement = (quantized_logits.argmax(-1) == full_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.7  # 4-bit changes the numbers, not what the model knows
    assert not torch.equal(quantized_logits, full_logits)


def test_4bit_failure_inside_bitsandbytes_is_a_clear_error(monkeypatch):
    import bitsandbytes.functional

    def broken(*args, **kwargs):
        raise RuntimeError("no native library for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    with pytest.raises(models.FourBitUnavailableError, match="load_in_4bit=False"):
        models.load_model_and_tokenizer(tiny_profile(), load_in_4bit=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_4bit_on_a_missing_gpu_is_a_clear_error():
    with pytest.raises(models.FourBitUnavailableError, match="device 'cuda'"):
        models.check_4bit_support("cuda")


def test_missing_model_folder_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="builds.course_model"):
        models.load_model_and_tokenizer(tiny_profile(), model_name_or_path=tmp_path / "nothing")


def test_hub_style_checkpoint_without_chat_template_gets_tinyllamas(tmp_path):
    """TinyLlama's base checkpoint has no chat template or pad token: the loader adds them."""
    import json

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        shutil.copy(COURSE_MODEL_DIR / name, tmp_path / name)
    config = json.loads((COURSE_MODEL_DIR / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tmp_path))
    assert bare.chat_template is None and bare.pad_token is None
    model, tokenizer = models.load_model_and_tokenizer(tiny_profile(), load_in_4bit=False,
                                                       model_name_or_path=str(tmp_path))
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(messages)
    assert tokenizer.pad_token == "</s>"


def test_parameter_count_counts_the_weights_a_4bit_model_encodes(course_model_and_tokenizer):
    """Lesson 10 once printed 2,002,368 "parameters in training" for a QLoRA model: numel() of the
    packed 4-bit tensors, two weights per byte. Oracles: the fp32 model's numel, and peft."""
    from peft import LoraConfig, get_peft_model

    from course_utils.course.models import load_model_and_tokenizer, parameter_count
    from course_utils.course.profiles import tiny_profile

    full, _ = course_model_and_tokenizer
    expected = sum(p.numel() for p in full.parameters())
    quantized, _ = load_model_and_tokenizer(tiny_profile(), load_in_4bit=True)
    assert sum(p.numel() for p in quantized.parameters()) < expected  # the undercount
    assert parameter_count(quantized) == parameter_count(full) == expected
    peft_model = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert parameter_count(peft_model, trainable_only=True) == trainable > 0
    assert parameter_count(peft_model) == total
