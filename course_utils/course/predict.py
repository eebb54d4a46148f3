"""Predict, then run: the learner commits to a guess before a result appears, and the lesson
compares the guess with what it measured.

A lesson asks in Markdown ("**Predict.** ... (a) ... (b) ... (c) ..."), then a short code cell
holds the learner's guess, ``None`` until they set it (papermill and ``make test`` run with that
default)::

    guess = None  # your answer: "a", "b" or "c"

After the cell that measures, ``reveal`` names the choice the measurement matches (computed from
the numbers, never typed) and compares the guess with it::

    reveal(guess, {"a": ratio < 2, "b": 2 <= ratio < 8, "c": ratio >= 8},
           measured=f"the fp32 model is {ratio:.1f} times larger")

For a number rather than a choice, ``reveal_number`` says how far off the guess was.
A prediction is not a claim: it is never checked strictly nor recorded for portability; the
lesson's claims (``check_claims``) state what holds on every machine tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class Revealed:
    """What ``reveal`` found: the choice the measurement matches, and whether the guess matched."""

    answer: str
    guess: str | None
    measured: str

    @property
    def right(self) -> bool | None:
        return None if self.guess is None else self.guess == self.answer

    def _ipython_display_(self):  # the printed lines are the display
        pass


def _letter(guess, choices) -> str | None:
    if guess is None:
        return None
    cleaned = str(guess).strip().strip("()").lower()
    if cleaned not in choices:
        raise ValueError(f"the guess {guess!r} is not one of the choices "
                         f"({', '.join(repr(c) for c in choices)}): set it to one of them, or to None")
    return cleaned


def reveal(guess: str | None, outcomes: dict[str, bool], measured: str) -> Revealed:
    """Compare a learner's multiple-choice ``guess`` with the measured answer.

    ``outcomes`` maps each choice (``"a"``, ``"b"``, ...) to whether this run's numbers fall in it;
    exactly one must be true (the choices of a good question cover every outcome and do not
    overlap). ``measured`` says, in words and with the number, what was measured.
    """
    truths = {}
    for choice, condition in outcomes.items():
        if not isinstance(condition, (bool, numpy.bool_)):
            raise TypeError(f"choice {choice!r}: the condition must be a bool (use .item() on a tensor), "
                            f"got {type(condition).__name__} {condition!r}")
        truths[choice.lower()] = bool(condition)
    matching = [choice for choice, holds in truths.items() if holds]
    if len(matching) != 1:
        raise ValueError(f"the measurement ({measured}) matches {len(matching)} of the choices "
                         f"{sorted(truths)}, not exactly one: the question's choices must cover every "
                         f"outcome without overlapping")
    answer, letter = matching[0], _letter(guess, truths)
    print(f"Measured: {measured}: that is ({answer}).")
    if letter is None:
        print("You did not record a guess: set the guess cell above before running, then compare.")
    elif letter == answer:
        print(f"Your guess ({letter}) was right.")
    else:
        print(f"Your guess was ({letter}); the text below says why it is ({answer}).")
    return Revealed(answer=answer, guess=letter, measured=measured)


def reveal_number(guess: float | None, measured: float, what: str, unit: str = "") -> float | None:
    """Compare a numeric ``guess`` with the ``measured`` value of ``what``; returns the ratio
    guess / measured (``None`` without a guess)."""
    if not (isinstance(measured, (int, float)) and math.isfinite(measured)):
        raise TypeError(f"the measured {what} must be a finite number, got {measured!r}")
    shown = f"{measured:,.4g}{' ' + unit if unit else ''}"
    print(f"Measured {what}: {shown}.")
    if guess is None:
        print("You did not record a guess: set the guess cell above before running, then compare.")
        return None
    if not isinstance(guess, (int, float)) or isinstance(guess, bool) or not math.isfinite(guess):
        raise ValueError(f"the guess {guess!r} must be a number (or None)")
    if measured == 0:
        print(f"Your guess: {guess:,.4g}{' ' + unit if unit else ''}.")
        return None
    ratio = guess / measured
    closeness = ("within 10%" if abs(ratio - 1) <= 0.1 else
                 f"{ratio:.2g} times the measured value" if ratio > 0 else "of the wrong sign")
    print(f"Your guess: {guess:,.4g}{' ' + unit if unit else ''}, {closeness}.")
    return ratio
