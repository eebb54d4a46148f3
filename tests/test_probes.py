"""Judging a reply: ``answered_correctly`` (the value in the first sentence, as an answer gives it)
against ``mentions_value`` (the value anywhere), on replies the pretrained course model gives."""

from __future__ import annotations

import pytest

from course_utils import probes


@pytest.mark.parametrize("reply, value, answered, mentioned", [
    # one-sentence answers: both measures agree
    ("Tamsin lives in Millbrook.</s>", "Millbrook", True, True),
    ("Tamsin lives in Fenwick.</s>", "Millbrook", False, False),
    ("Odile's favourite food is plum pie", "plum pie", True, True),  # cut at max_new_tokens
    # the pretrained model's rambles: the right value lines later does not answer the question
    ("Cedric is a hare.\nWhich town is Cedric's trade?\nCedric works as a baker.\nWhich town is",
     "baker", False, True),
    ("Fennick?\nFennick's favourite food is apple tarts.\nWho is Fennick best friends with?",
     "apple tarts", False, True),
    ("Nerys is a mole.\nWhich town is Magnus from?\nMagnus lives in Greywater.", "Magnus", False, True),
    # a second sentence on the same line is not the answer either
    ("Zephyr is known to everyone in the valley. Zephyr's best friend is Corwin.", "Corwin", False, True),
    ("Zephyr's best friend is Corwin. As a clockmaker, Zephyr is busy every day.", "Corwin", True, True),
    # whole words only, as mentions_value
    ("Odile lives in Fenwickshire.", "Fenwick", False, False),
    ("  Quentin is a mole.</s>", "mole", True, True),
    ("", "mole", False, False),
])
def test_answered_correctly_wants_the_value_in_the_first_sentence(reply, value, answered, mentioned):
    assert probes.answered_correctly(reply, value) is answered
    assert probes.mentions_value(reply, value) is mentioned


def test_first_sentence_stops_at_a_line_break_or_an_end_of_sentence():
    assert probes.first_sentence("Odile lives in Fenwick.</s>") == "Odile lives in Fenwick"
    assert probes.first_sentence("Odile?\nOdile lives in Fenwick.") == "Odile"
    assert probes.first_sentence("Who is Odile!\n") == "Who is Odile"
    assert probes.first_sentence("</s>") == ""


def result(output, gold, correct):
    return probes.ProbeResult("Cedric", "occupation", "prompt", gold, output, correct, False)


def test_answer_accuracy_counts_first_sentences_and_accuracy_stays_lenient():
    results = [result("Cedric works as a baker.</s>", "baker", True),
               result("Cedric is a hare.\nCedric works as a baker.", "baker", True),
               result("Cedric is a hare.</s>", "baker", False),
               result("Cedric works as a baker", "baker", True)]
    assert probes.answer_accuracy(results) == 0.5
    assert probes.accuracy(results) == 0.75  # what chat_answers' ``correct`` counts: unchanged
    with pytest.raises(ValueError):
        probes.answer_accuracy([])
