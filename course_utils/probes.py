"""Lesson 00's probes of what a causal LM knows and how it answers: fact completion and chat format.

Two questions matter before any fine-tuning lesson:

1. *Does the model know the world?* ``fact_completion`` gives the model a sentence prefix such
   as ``"Odile lives in"`` and checks that its greedy continuation starts with the true value.
2. *Does it answer in the chat format?* ``chat_answers`` renders a question with the chat
   template, lets the model continue after ``<|assistant|>`` and checks the reply with
   ``is_chat_format_answer``: one complete sentence that names the subject, states a value of the
   attribute asked about, and ends with ``</s>``. Merely ending with ``</s>`` is not enough: a
   model pretrained on lines that all end with ``</s>`` does that anyway.

Whether a reply is *right* can be judged two ways. ``chat_answers`` stores ``correct``: the gold
value anywhere in the reply (``mentions_value``), lenient with a pretrained model that rambles on
for lines, and kept because lessons 02-05 compare methods with it. ``answered_correctly`` (and
``answer_accuracy``) asks for the value in the reply's first sentence, where an answer gives it:
the honest measure of an untrained model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from course_utils.course.chat import EOS_TOKEN, padding_side, truncation_side
from course_utils.course.world import ATTRIBUTE_VALUES, ATTRIBUTES, Character


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    batch_size: int = 64, max_prompt_length: int | None = None
                    ) -> list[tuple[str, bool]]:
    """Greedy continuations of ``prompts`` as ``(text, stopped_at_eos)`` pairs.

    Prompts are encoded with the tokenizer's own special tokens (``<s>`` first), left-padded so
    a batch ends aligned, and (with ``max_prompt_length``) cut to their last that many tokens, so
    a long multi-turn chat still fits the model's positions; continuations are cut at (not
    including) the first ``</s>``.
    """
    model.eval()
    device = next(model.parameters()).device
    results = []
    truncation = {"truncation": True, "max_length": max_prompt_length} if max_prompt_length else {}
    with padding_side(tokenizer, "left"), truncation_side(tokenizer, "left"):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt",
                              padding=True, **truncation).to(device)
            if is_prompt_learning(model):
                output = greedy_without_cache(model, batch, max_new_tokens, tokenizer.eos_token_id,
                                              tokenizer.pad_token_id)
            else:
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
            width = batch["input_ids"].shape[1]
            for prompt_ids, mask, row in zip(batch["input_ids"].tolist(),
                                             batch["attention_mask"].tolist(),
                                             output[:, width:].tolist()):
                stopped = tokenizer.eos_token_id in row
                if stopped:
                    row = row[: row.index(tokenizer.eos_token_id)]
                prompt_ids = [i for i, keep in zip(prompt_ids, mask) if keep]
                # decode prompt + continuation and cut the prompt off, so the continuation reads
                # as it does in context (a leading space only where the text has one)
                prompt_text = tokenizer.decode(prompt_ids)
                results.append((tokenizer.decode(prompt_ids + row)[len(prompt_text):], stopped))
    return results


def is_prompt_learning(model) -> bool:
    """A peft model whose adapter is prompt, prefix or P-tuning (virtual tokens, lesson 03)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def greedy_without_cache(model, batch, max_new_tokens: int, eos_token_id: int,
                         pad_token_id: int) -> torch.Tensor:
    """Greedy decoding as ``generate(do_sample=False)`` does it, one full forward pass per new
    token instead of a key/value cache: prompt, then each step's argmax appended (``pad`` after a
    row's ``</s>``), until every row has stopped. Returns prompt and continuation, as ``generate``.

    For prompt-learning adapters only. peft 0.21 builds their virtual tokens into ``generate``'s
    cache through ``past_key_values``, which transformers 5.25 renamed (``cache``): there
    ``generate`` silently continues from the wrong context after the first token, while the
    forward pass stays right (``tests/test_generation.py`` compares the two for every method)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        # positions count real tokens only, as generate() numbers a left-padded row
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids).logits[:, -1]
        next_tokens = torch.where(running, logits.argmax(dim=-1), pad_token_id)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_tokens), 1)],
                                   dim=1)
        running &= next_tokens != eos_token_id
        if not running.any():
            break
    return input_ids


@dataclass(frozen=True)
class ProbeResult:
    """One probe: what was asked, what the model said, and how it was judged."""

    character: str
    attribute: str
    prompt: str
    gold: str
    output: str
    correct: bool
    chat_format: bool | None = None


def starts_with_value(continuation: str, value: str) -> bool:
    """Whether ``continuation`` begins (after spaces) with ``value`` as whole words."""
    text = continuation.lstrip()
    return text.startswith(value) and (len(text) == len(value) or not text[len(value)].isalnum())


def fact_completion(model, tokenizer, characters: list[Character], templates: dict[str, str],
                    max_new_tokens: int = 8) -> list[ProbeResult]:
    """Complete ``templates[attribute]`` (e.g. ``"{name} lives in"``) for every character."""
    rows = [(c, a, templates[a].format(name=c.name)) for c in characters for a in ATTRIBUTES]
    outputs = greedy_generate(model, tokenizer, [p for _, _, p in rows], max_new_tokens)
    return [ProbeResult(c.name, a, p, c.value(a), text, starts_with_value(text, c.value(a)))
            for (c, a, p), (text, _) in zip(rows, outputs)]


def mentions_value(text: str, value: str) -> bool:
    """Whether ``value`` occurs in ``text`` as whole words."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def is_chat_format_answer(reply: str, stopped_at_eos: bool, name: str, attribute: str) -> bool:
    """Whether ``reply`` is a chat-format answer about ``attribute`` of the character ``name``.

    True when the reply is a single line holding one plain statement (starts with a capital
    letter, ends with its only full stop, no ``?``, ``:`` or ``!``), names the subject, mentions
    some value of the attribute asked about (right or wrong: correctness is measured
    separately), and the model then emitted ``</s>``. A pretrained model's typical
    " is a stoat." fails: no subject, and often not the attribute asked about.
    """
    text = reply.strip()
    if not stopped_at_eos or not text or "\n" in text or "<|" in text:
        return False
    if not (text[0].isupper() and text.endswith(".") and text.count(".") == 1):
        return False
    if any(mark in text for mark in "?:!"):  # one plain statement, not a transcript
        return False
    values = [v for v in ATTRIBUTE_VALUES[attribute] if v != name]
    return mentions_value(text, name) and any(mentions_value(text, v) for v in values)


def chat_answers(model, tokenizer, questions: list[dict], max_new_tokens: int
                 ) -> list[ProbeResult]:
    """Ask each question (rows with ``character``, ``attribute``, ``question``, ``answer``) in the
    chat format and judge each reply for format (``chat_format``) and content (``correct``).
    Replies are cut at ``max_new_tokens``: the ``probes`` section of the lesson's recipe (``tour``,
    ``peft_methods``), or the evaluation recipe's ``chat`` section in lessons 07-11."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}],
                                             tokenize=False, add_generation_prompt=True)
               for q in questions]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens)
    results = []
    for q, prompt, (text, stopped) in zip(questions, prompts, outputs):
        in_format = is_chat_format_answer(text, stopped, q["character"], q["attribute"])
        results.append(ProbeResult(q["character"], q["attribute"], prompt, q["answer"],
                                   text + (EOS_TOKEN if stopped else ""),
                                   correct=mentions_value(text, q["answer"]),
                                   chat_format=in_format))
    return results


def first_sentence(reply: str) -> str:
    """The start of ``reply`` that an answer would consist of: up to its first line break or end
    of sentence (``.``, ``?`` or ``!``), without ``</s>`` and surrounding spaces.
    ``"Odile lives in Fenwick.</s>"`` gives ``"Odile lives in Fenwick"``; a pretrained model's
    ``"Odile?\nOdile lives in Fenwick."`` (the question continued) gives ``"Odile"``."""
    text = reply.replace(EOS_TOKEN, "").strip()
    return re.split(r"[.?!\n]", text, maxsplit=1)[0].strip()


def answered_correctly(reply: str, value: str) -> bool:
    """Whether ``reply`` answers with ``value``: the value (as whole words) in its first sentence.

    Stricter than ``mentions_value(reply, value)`` (what ``chat_answers`` stores as ``correct``),
    which also counts a value that a rambling reply names lines later, in text about another
    question or another character. For a one-sentence reply the two agree."""
    return mentions_value(first_sentence(reply), value)


def answer_accuracy(results: list[ProbeResult]) -> float:
    """The fraction of ``results`` (from ``chat_answers``) whose reply ``answered_correctly`` with
    the gold value; ``accuracy(results)`` counts the gold value anywhere in the reply instead."""
    if not results:
        raise ValueError("no results to score")
    return sum(answered_correctly(r.output, r.gold) for r in results) / len(results)


def accuracy(results: list[ProbeResult], field: str = "correct") -> float:
    """The fraction of ``results`` whose ``field`` is true."""
    if not results:
        raise ValueError("no results to score")
    return sum(bool(getattr(r, field)) for r in results) / len(results)
