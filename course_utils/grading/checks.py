"""Checks that graded test cells (and learners' self-checks) call.

A graded test cell in a solution notebook carries ``metadata["course"] = {"grade_id": ...,
"points": ..., "hint": ...}`` and passes when it runs without an exception. Its checks compare the
student's function against an independent reference on inputs the student has not seen:
``grader_rng()`` draws them from ``COURSE_GRADER_SEED`` when it is set (the course's grader sets it
per run and question, from a fresh seed or ``--seed``) and from a fresh seed otherwise, so under
``nbgrader autograde`` too every run draws new hidden inputs and a hard-coded answer cannot pass.
Set the variable to repeat a run's inputs.
"""

from __future__ import annotations

import os
import random
import secrets

from course_utils.numerics import check_close  # noqa: F401  (graded cells import it from here)

SEED_VARIABLE = "COURSE_GRADER_SEED"
#: drawn once per process when the variable is unset: one notebook run, one set of inputs
_FRESH_SEED = secrets.randbelow(2**31)


def grader_seed() -> int:
    """The seed for hidden inputs: ``COURSE_GRADER_SEED`` if set, else fresh for this process."""
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else _FRESH_SEED


def grader_rng() -> random.Random:
    """A ``random.Random`` seeded with ``grader_seed()``."""
    return random.Random(grader_seed())


def check_type(value, expected_type, what: str = "the result") -> None:
    """Raise ``AssertionError`` unless ``value`` is an instance of ``expected_type``."""
    if not isinstance(value, expected_type):
        names = getattr(expected_type, "__name__", str(expected_type))
        raise AssertionError(f"{what} should be {names}, got {type(value).__name__}")


def first_difference(actual, expected) -> str:
    """Where two sequences (lists, strings) first differ, in a few words."""
    for index, (a, e) in enumerate(zip(actual, expected)):
        if a != e:
            if isinstance(expected, str):
                return (f"first difference at character {index}: expected "
                        f"{expected[index:index + 20]!r}, got {actual[index:index + 20]!r}")
            return f"first difference at index {index}: expected {e!r}, got {a!r}"
    return f"lengths differ: expected {len(expected)}, got {len(actual)}"


def check_equal(actual, expected, what: str = "the result") -> None:
    """Raise ``AssertionError`` with a short, readable difference unless ``actual == expected``.

    For two lists or two strings the message says where they first differ.
    """
    if actual == expected:
        return
    if isinstance(actual, (list, tuple, str)) and type(actual) is type(expected):
        raise AssertionError(f"{what} is wrong: {first_difference(actual, expected)}")
    raise AssertionError(f"{what} is wrong: expected {expected!r:.200}, got {actual!r:.200}")


WORDS = ["Odile", "Marrowby", "stoat", "where", "does", "live", "the", "valley", "honey", "cakes",
         "What", "is", "a", "friend", "lantern", "blue", "Hello", "thanks", "42", "3.5", "café",
         "naïve", "—", "why?", "yes!", "(maybe)", "x_y", "it's", "<b>", "emoji:🙂"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "Be polite and correct."]


def random_text(rng: random.Random, max_words: int = 12) -> str:
    """A short random text: words, numbers, punctuation, accents, sometimes a line break."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), "\n")
    return " ".join(words).replace(" \n ", "\n")


def random_conversation(rng: random.Random, end_with_assistant: bool = True) -> list[dict]:
    """An optional system turn, then 1-3 user/assistant exchanges (the last reply optional)."""
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": random_text(rng)})
        messages.append({"role": "assistant", "content": random_text(rng)})
    if not end_with_assistant:
        messages.pop()
    return messages


def random_llama_config(rng: random.Random):
    """A random, valid Llama-family config: any width, GQA or not, tied or untied, with or
    without biases. For checks that must hold for every architecture, not just the example."""
    from transformers import LlamaConfig

    head_dim = rng.choice([8, 16, 32, 64])
    heads = rng.choice([2, 4, 8, 12])
    kv_heads = rng.choice([h for h in (1, 2, 4, heads) if heads % h == 0])
    return LlamaConfig(
        vocab_size=rng.randint(100, 50_000), hidden_size=heads * head_dim,
        intermediate_size=rng.randint(16, 4096), num_hidden_layers=rng.randint(1, 40),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=rng.random() < 0.3, attention_bias=rng.random() < 0.2,
        mlp_bias=rng.random() < 0.2)
