"""From-scratch PEFT modules against peft (LoRA, (IA)^3) and against their own definition
(Houlsby adapters: identity at initialisation, parameter-count formula)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from course_utils import peft_scratch
from course_utils.course.paths import COURSE_MODEL_DIR


class OneLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("n_in, n_out, r, alpha, rslora", [(6, 5, 2, 4, False), (32, 48, 8, 16, False),
                                                           (17, 9, 4, 32, True)])
def test_lora_linear_matches_peft_forward_and_merge(n_in, n_out, r, alpha, rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(n_in)
    base = OneLinear(n_in, n_out)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora))
    peft_layer = peft_model.base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight)  # non-zero B: a meaningful comparison
    ours = peft_scratch.LoRALinear(copy.deepcopy(base.proj), r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]
    x = torch.randn(3, 7, n_in)
    torch.testing.assert_close(ours(x), peft_model(x))
    merged = peft_model.merge_and_unload()
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged.proj.weight)
    torch.testing.assert_close(ours(x), merged(x))
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, base.proj.weight)


def test_lora_starts_as_the_base_layer_and_trains_only_a_and_b():
    base = nn.Linear(8, 4)
    lora = peft_scratch.LoRALinear(copy.deepcopy(base), r=2, alpha=4, dropout=0.1)
    lora.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(lora(x), base(x))
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.fixture(scope="module")
def course_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(COURSE_MODEL_DIR).eval()


def test_ia3_matches_peft_on_the_course_model(course_model):
    from peft import IA3Config, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(course_model), IA3Config(task_type="CAUSAL_LM"))
    config = peft_model.peft_config["default"]
    assert set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    ours = copy.deepcopy(course_model)
    for name, parameter in peft_model.named_parameters():
        if "ia3_l" in name:
            nn.init.uniform_(parameter, 0.5, 1.5)
    for index, layer in enumerate(ours.model.layers):
        for sublayer, name in [(layer.self_attn, "k_proj"), (layer.self_attn, "v_proj"),
                               (layer.mlp, "down_proj")]:
            scale = "input" if name in config.feedforward_modules else "output"
            wrapped = peft_scratch.IA3Linear(getattr(sublayer, name), scale)
            peft_layer = getattr(getattr(peft_model.base_model.model.model.layers[index],
                                         "mlp" if name == "down_proj" else "self_attn"), name)
            with torch.no_grad():
                wrapped.ia3_l.copy_(peft_layer.ia3_l["default"].flatten())
            setattr(sublayer, name, wrapped)
    ids = torch.randint(3, 1000, (2, 16))
    torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_houlsby_adapters_start_as_identity_and_count_as_the_formula(course_model):
    model = copy.deepcopy(course_model)
    adapters = peft_scratch.add_houlsby_adapters(model, bottleneck=8)
    config = model.config
    assert len(adapters) == 2 * config.num_hidden_layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * config.num_hidden_layers * peft_scratch.adapter_parameters(
        config.hidden_size, 8)
    ids = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   course_model(input_ids=ids).logits, rtol=0, atol=0)
    # after a training step the adapters change the output, and only they received gradients
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "adapter" not in n)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, course_model(input_ids=ids).logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        peft_scratch.LoRALinear(nn.Linear(2, 2), r=0)
    with pytest.raises(ValueError, match="'output' or 'input'"):
        peft_scratch.IA3Linear(nn.Linear(2, 2), scale="both")
