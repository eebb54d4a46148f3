"""The chat template: our copy is TinyLlama-Chat's, renders like the tokenizer, and masks labels."""

from __future__ import annotations

import pytest

from course_utils.course.chat import (
    IGNORE_INDEX,
    TINYLLAMA_CHAT_TEMPLATE,
    assistant_only_labels,
    render_chat,
)
from course_utils.course.paths import COURSE_MODEL_DIR

CONVERSATIONS = [
    [{"role": "user", "content": "Where does Odile live?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1."},
     {"role": "user", "content": "Q2 with\nnewline"}, {"role": "assistant", "content": "A2."}],
    # a reply whose first word is split off its leading space, punctuation, accents, line breaks
    [{"role": "user", "content": "Hm?"}, {"role": "assistant", "content": "it's (maybe) café\nyes!"}],
]


def test_template_is_tinyllama_chat_v1_character_for_character():
    # The well-known distinctive details of TinyLlama-1.1B-Chat-v1.0's template.
    assert "{{ '<|assistant|>\n'  + message['content'] + eos_token }}" in TINYLLAMA_CHAT_TEMPLATE
    assert TINYLLAMA_CHAT_TEMPLATE.startswith("{% for message in messages %}\n")
    assert TINYLLAMA_CHAT_TEMPLATE.endswith("{% endfor %}")
    # 11 line breaks between the 12 template lines, and one inside each of the 3 role strings
    assert TINYLLAMA_CHAT_TEMPLATE.count("\n") == 11 + 3


def test_template_renders_tinyllamas_model_card_example(tokenizer):
    """The prompt TinyLlama-1.1B-Chat-v1.0's model card prints for its pipeline example."""
    messages = [
        {"role": "system", "content": "You are a friendly chatbot who always responds in the "
                                      "style of a pirate"},
        {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
    ]
    expected = ("<|system|>\nYou are a friendly chatbot who always responds in the style of a "
                "pirate</s>\n<|user|>\nHow many helicopters can a human eat in one sitting?</s>\n"
                "<|assistant|>\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=True) == expected


def test_course_model_ships_the_same_template():
    assert (COURSE_MODEL_DIR / "chat_template.jinja").read_text() == TINYLLAMA_CHAT_TEMPLATE


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_chat_matches_jinja_rendering(tokenizer, messages, generation_prompt):
    expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    assert render_chat(messages, add_generation_prompt=generation_prompt) == expected


def test_generation_prompt_ends_with_assistant_tag_and_newline(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>\nWhere does Odile live?</s>\n<|assistant|>\n"


def test_render_chat_rejects_unknown_roles():
    with pytest.raises(ValueError, match="role 'bot'"):
        render_chat([{"role": "bot", "content": "x"}])


@pytest.mark.parametrize("messages", CONVERSATIONS[1:])
def test_labelled_tokens_are_what_the_reply_adds_after_the_generation_prompt(tokenizer, messages):
    _, labels = assistant_only_labels(tokenizer, messages)
    last_reply = labels[:-1]  # drop the line break after the final </s>
    count = 0
    while last_reply and last_reply.pop() != IGNORE_INDEX:
        count += 1
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
    prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                     add_generation_prompt=True))["input_ids"]
    assert count == len(full) - len(prompt) - 1


@pytest.mark.parametrize("messages", CONVERSATIONS[1:])
def test_assistant_only_labels_keep_exactly_the_assistant_replies(tokenizer, messages):
    input_ids, labels = assistant_only_labels(tokenizer, messages)
    assert len(input_ids) == len(labels)
    assert input_ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    kept = [i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    # each reply starts after a line break, so its first token carries the tokenizer's space
    expected = "".join(" " + m["content"] + "</s>" for m in messages if m["role"] == "assistant")
    assert tokenizer.decode(kept) == expected
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(input_ids, labels))


def test_assistant_only_labels_ids_match_plain_encoding(tokenizer):
    messages = CONVERSATIONS[2]
    input_ids, _ = assistant_only_labels(tokenizer, messages)
    assert input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
