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
import transformers

from course_utils import peft_comparison, probes
from course_utils.course.models import load_model_and_tokenizer
from course_utils.course.profiles import tiny_profile

# of different lengths, so that a batch is left-padded as the lessons' batches are (with a shifted
# position for every padded token, prefix tuning answers differently: the bug this would show)
QUESTIONS = ["Where does Odile live?", "Tell me, please, in one short sentence: what is Alder's favourite "
             "colour?", "Who is Briony's friend?", "What does Sabine do?", "Where does Alder live, and "
             "with whom?", "Odile's pet?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def course_model():
    return load_model_and_tokenizer(tiny_profile(), load_in_4bit=False)


def adapted(name, base_model):
    model = peft_comparison.make_method(name, base_model, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
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
    """``probes.greedy_generate``, which every lesson's answers go through, on both the pinned and
    the newest releases (one prompt per call: a left-padded batch changes what a prompt-learning
    adapter answers, in ``generate`` too, because peft ignores their position ids)."""
    base_model, tokenizer = course_model
    model = adapted(name, base_model)
    for prompt in prompts(tokenizer):
        (text, stopped), = probes.greedy_generate(model, tokenizer, [prompt], NEW_TOKENS)
        oracle = step_by_step(model, tokenizer, prompt)
        prompt_ids = tokenizer(prompt).input_ids
        expected = tokenizer.decode(prompt_ids + [t for t in oracle if t != tokenizer.eos_token_id])
        assert (text, stopped) == (expected[len(tokenizer.decode(prompt_ids)):],
                                   tokenizer.eos_token_id in oracle), name


@pytest.mark.skipif(tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 25),
                    reason="generate() is itself wrong for prompt learning from transformers 5.25")
@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_decoding_without_a_cache_answers_a_padded_batch_as_generate_does(name, course_model):
    """On the pinned releases, where ``generate`` is right, the course's cache-free decoding gives
    the same replies for a left-padded batch (position ids counted as ``generate`` counts them)."""
    base_model, tokenizer = course_model
    model = adapted(name, base_model)
    batch = prompts(tokenizer)
    ours = probes.greedy_generate(model, tokenizer, batch, NEW_TOKENS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probes, "is_prompt_learning", lambda model: False)  # transformers' generate()
        theirs = probes.greedy_generate(model, tokenizer, batch, NEW_TOKENS)
    assert ours == theirs
