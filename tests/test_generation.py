"""Generation agrees with the model's own forward pass, for every method of lessons 02-05.

A library release can change how ``generate`` feeds a cache to an adapter without any error: with
transformers 5.25 and peft 0.21.2, greedy ``generate`` from prompt, P- and prefix-tuning adapters
continues from the wrong context after the first token (lesson 05's prompt-learning rows fell to a
few percent). The oracle here is the definition of greedy decoding: one full forward pass per step
with the adapter in place, the argmax appended. Each adapter's trainable weights are perturbed
(seeded) so that the adapter changes the replies.
"""

from __future__ import annotations

import pytest
import torch

from course_utils import peft_comparison, probes
from course_utils.course.models import load_model_and_tokenizer
from course_utils.course.profiles import tiny_profile

QUESTIONS = ["Where does Odile live?", "What is Alder's favourite colour?", "Who is Briony's friend?"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def course_model():
    return load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)


def adapted(name, base_model):
    model = peft_comparison.make_method(name, base_model, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()


@torch.no_grad()
def step_by_step(model, tokenizer, prompt: str) -> list[int]:
    """Greedy decoding by definition: a full forward pass per new token, no cache."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = []
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        new.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in QUESTIONS]


@pytest.mark.parametrize("name", peft_comparison.METHODS)
def test_generate_matches_the_forward_pass(name, course_model):
    """transformers' own ``generate`` (what a learner's code calls). Fails for the prompt-learning
    methods on transformers 5.25 with peft 0.21.2: the reason the course pins 5.23."""
    base_model, tokenizer = course_model
    model = adapted(name, base_model)
    for prompt in prompts(tokenizer):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        oracle = step_by_step(model, tokenizer, prompt)
        assert output[:len(oracle)] == oracle, f"{name}: generate {output}, forward pass {oracle}"


@pytest.mark.parametrize("name", peft_comparison.METHODS)
def test_the_course_generates_what_the_forward_pass_says(name, course_model):
    """``probes.greedy_generate``, which every lesson's answers go through, batched and left-padded
    as lessons call it, on both the pinned and the newest releases."""
    base_model, tokenizer = course_model
    model = adapted(name, base_model)
    replies = probes.greedy_generate(model, tokenizer, prompts(tokenizer), NEW_TOKENS)
    for prompt, (text, stopped) in zip(prompts(tokenizer), replies):
        oracle = step_by_step(model, tokenizer, prompt)
        prompt_ids = tokenizer(prompt).input_ids
        expected = tokenizer.decode(prompt_ids + [t for t in oracle if t != tokenizer.eos_token_id])
        assert (text, stopped) == (expected[len(tokenizer.decode(prompt_ids)):],
                                   tokenizer.eos_token_id in oracle), name
