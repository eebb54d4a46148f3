"""TinyLlama's chat format, shared by the course model and the real TinyLlama.

``TINYLLAMA_CHAT_TEMPLATE`` is, character for character, the Jinja template shipped with
``TinyLlama/TinyLlama-1.1B-Chat-v1.0`` (Zephyr style). A conversation renders as::

    <|system|>
    You are helpful.</s>
    <|user|>
    Where does Odile live?</s>
    <|assistant|>
    Odile lives in Marrowby.</s>

with a newline after every ``</s>``, no ``<s>`` (the tokenizer adds it when encoding), and, with
``add_generation_prompt=True``, a final ``<|assistant|>`` line for the model to continue.
"""

from __future__ import annotations

from contextlib import contextmanager

# Copied from TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json. Note the two spaces before `+` on
# the assistant line: they are part of the original and change nothing in the output.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
EOS_TOKEN = "</s>"


def render_chat(messages: list[dict], add_generation_prompt: bool = False,
                eos_token: str = EOS_TOKEN) -> str:
    """Render ``messages`` exactly as ``TINYLLAMA_CHAT_TEMPLATE`` does, in plain Python.

    Each message is ``{"role": "system" | "user" | "assistant", "content": str}``. Jinja keeps
    the newline after every ``{{ ... }}`` line, which is why each turn ends in ``</s>\\n``.
    Tests check this function against ``apply_chat_template``.
    """
    text, _ = render_chat_with_spans(messages, eos_token)
    if add_generation_prompt and messages:
        text += f"{ROLE_TAGS['assistant']}\n"
    return text


def render_chat_with_spans(messages: list[dict], eos_token: str = EOS_TOKEN
                           ) -> tuple[str, list[tuple[int, int]]]:
    """``render_chat(messages)`` and the character spans a model should learn to produce.

    Each span covers one assistant turn's content *and* its closing ``</s>`` (so the model learns
    to stop), but not the role tag or the newline after ``</s>``.
    """
    text, spans = "", []
    for message in messages:
        tag = ROLE_TAGS.get(message.get("role"))
        if tag is None:
            raise ValueError(f"message {len(spans)} has role {message.get('role')!r}; "
                             f"expected one of {sorted(ROLE_TAGS)}")
        text += f"{tag}\n"
        start = len(text)
        text += f"{message['content']}{eos_token}"
        if message["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


IGNORE_INDEX = -100  # positions PyTorch's cross-entropy (and so every HF model) skips


def assistant_only_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels that train on assistant tokens only.

    ``labels[i]`` is ``input_ids[i]`` for tokens of an assistant turn (its content and its
    ``</s>``) and ``IGNORE_INDEX`` (-100) elsewhere: ``<s>``, system and user turns, role tags and
    line breaks. A turn's tokens are found the way trl splits prompt from completion: encode the
    text up to the turn's first character and up to its last, and take the tokens in between.
    (Character offsets would not do: the course tokenizer's space after a line break maps to
    the line break's character.) Labels are not shifted; the model shifts them internally.
    """
    text, spans = render_chat_with_spans(messages, tokenizer.eos_token)
    input_ids = tokenizer(text)["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        before = tokenizer(text[:start])["input_ids"]
        through = tokenizer(text[:end])["input_ids"]
        if input_ids[:len(through)] != through or through[:len(before)] != before:
            raise ValueError("this tokenizer merges tokens across the start or end of a reply, "
                             "so a reply's tokens cannot be told apart; render the prompt and "
                             "the reply separately instead")
        labels[len(before):len(through)] = input_ids[len(before):len(through)]
    return input_ids, labels


@contextmanager
def _tokenizer_side(tokenizer, attribute: str, side: str):
    previous = getattr(tokenizer, attribute)
    setattr(tokenizer, attribute, side)
    try:
        yield tokenizer
    finally:
        setattr(tokenizer, attribute, previous)


def padding_side(tokenizer, side: str):
    """Pad on ``side`` ("left" to generate, "right" to score) inside the block, then restore."""
    return _tokenizer_side(tokenizer, "padding_side", side)


def truncation_side(tokenizer, side: str):
    """Truncate on ``side`` ("left" keeps a prompt's end, where the question is) inside the block."""
    return _tokenizer_side(tokenizer, "truncation_side", side)
