"""Lesson 05's ranking at tuned learning rates (``scripts/peft_sweep.py``, committed in
``peft_sweep/results.json``): the file matches today's recipe and grid, and the ranking the lesson
prints follows from its runs, recomputed here independently of ``peft_comparison``."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from course_utils import peft_comparison
from course_utils.course.paths import REPO_ROOT

FIELDS = ("heldout_accuracy", "heldout_loss", "trainable_parameters", "chat_format_rate",
          "corpus_perplexity", "fact_completion")


@pytest.fixture(scope="module")
def record():
    return json.loads(peft_comparison.SWEEP_PATH.read_text())


def test_the_committed_sweep_matches_todays_recipe_and_grid(record):
    recipe = peft_comparison.methods_recipe()
    assert record["complete"], "the sweep stopped before its last run: rerun scripts/peft_sweep.py"
    assert record["recipe_sha256"] == recipe.sha256, (
        "configs/recipes/tiny/peft_methods.yaml changed since peft_sweep/results.json was made: rerun "
        "`OMP_NUM_THREADS=1 python scripts/peft_sweep.py` and commit the file")
    assert record["steps"] == recipe.training["steps"] and record["questions"] == 120
    assert set(record["methods"]) == set(peft_comparison.SWEEP_METHODS), "lesson 05 ranks every method"
    assert len(record["seeds"]) >= 3, "an interval over seeds needs at least three of them"
    for method in record["methods"]:
        assert record["recipe_rates"][method] == recipe.learning_rates[method]
        grid = peft_comparison.rate_grid(recipe.learning_rates[method])
        assert record["learning_rates"][method][:3] == grid
    cells = [(run["method"], run["learning_rate"], run["seed"]) for run in record["runs"]]
    expected = {(m, rate, seed) for m in record["methods"] for rate in record["learning_rates"][m]
                for seed in record["seeds"]}
    assert len(cells) == len(set(cells)) and set(cells) == expected, "every method x rate x seed, once"
    for run in record["runs"]:
        assert all(field in run for field in FIELDS)
        assert 0 <= run["heldout_accuracy"] <= 1 and run["heldout_loss"] > 0
        # accuracies are counts of the 120 questions
        assert math.isclose(run["heldout_accuracy"] * 120, round(run["heldout_accuracy"] * 120), abs_tol=1e-6)


def one_step(rate, direction):
    """The next rate on the 1-3-10 grid, up (+1) or down (-1)."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    first_digit = round(rate / 10 ** exponent)
    steps = {(1, 1): 3, (3, 1): 10, (1, -1): 0.3, (3, -1): 1}
    return float(f"{steps[(first_digit, direction)] * 10 ** exponent:.1g}")


def test_the_search_steps_past_an_edge_until_it_brackets_the_best_rate(record):
    """Each rate beyond the first three was added because the lowest mean held-out loss so far sat
    at the edge it lies past; the search stops once the lowest is inside, or after
    ``max_extensions`` steps."""
    assert one_step(3e-3, 1) == 1e-2 and one_step(1e-3, -1) == 3e-4 and one_step(1e-2, 1) == 3e-2
    bracketed = 0
    for method in record["methods"]:
        rates = record["learning_rates"][method]
        loss = {rate: statistics.fmean(r["heldout_loss"] for r in record["runs"]
                                       if r["method"] == method and r["learning_rate"] == rate)
                for rate in rates}
        for tried in range(3, len(rates) + 1):
            so_far = sorted(rates[:tried])
            best = min(so_far, key=loss.get)
            at_edge = best in (so_far[0], so_far[-1])
            if tried < len(rates):
                assert at_edge, f"{method}: {rates[tried]} was added with the best rate inside"
                assert rates[tried] == one_step(best, 1 if best == so_far[-1] else -1), method
            else:
                assert not at_edge or tried - 3 == record["max_extensions"], f"{method}: stopped at an edge"
                bracketed += not at_edge
    assert bracketed == len(record["methods"]), "every method's best rate lies inside the rates tried"


def independent_ranking(record):
    """The ranking, recomputed: per method the rate with the lowest mean held-out loss; there, the
    mean accuracy over seeds and its 95% Student-t interval; tied with the top = overlapping it."""
    t_975 = {2: 4.302653, 3: 3.182446, 4: 2.776445}  # Student's t quantiles, by degrees of freedom
    rows = {}
    for method in record["methods"]:
        runs = [run for run in record["runs"] if run["method"] == method]
        rates = sorted({run["learning_rate"] for run in runs})

        def mean_loss(rate, runs=runs):
            return statistics.fmean(r["heldout_loss"] for r in runs if r["learning_rate"] == rate)

        chosen = min(rates, key=mean_loss)
        accuracies = [r["heldout_accuracy"] for r in runs if r["learning_rate"] == chosen]
        mean = statistics.fmean(accuracies)
        half = t_975[len(accuracies) - 1] * statistics.stdev(accuracies) / math.sqrt(len(accuracies))
        rows[method] = (chosen, max(0.0, mean - half), mean, min(1.0, mean + half))  # an accuracy
    top = max(rows, key=lambda m: rows[m][2])
    tied = {m for m in rows if m != top and rows[m][3] >= rows[top][1]}
    return rows, top, tied


def test_the_lessons_ranking_follows_from_the_runs(record):
    rows, top, tied = independent_ranking(record)
    summary = peft_comparison.sweep_summary(record)
    for row in summary:
        chosen, low, mean, high = rows[row["method"]]
        assert row["learning_rate"] == chosen
        assert (row["low"], row["accuracy"], row["high"]) == pytest.approx((low, mean, high), abs=1e-4)
    found_top, found_tied, found_below = peft_comparison.ranking_tiers(summary)
    assert found_top["method"] == top
    assert {row["method"] for row in found_tied} == tied
    assert {row["method"] for row in found_below} == set(rows) - tied - {top}
    sentence = peft_comparison.ranking_sentence(summary)
    assert top in sentence and all(method in sentence for method in rows)
    assert ("tied" in sentence.lower()) == bool(tied)
    assert "best" not in sentence.replace("no one of them is 'best'", "")


def test_lesson_05_prints_the_ranking_from_the_committed_file():
    notebook = json.loads((REPO_ROOT / "notebooks" / "05_ia3.ipynb").read_text())
    code = "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert "peft_comparison.SWEEP_PATH" in code and "ranking_sentence(" in code


def test_the_rate_grid_and_the_interval():
    assert peft_comparison.rate_grid(1e-3) == [3e-4, 1e-3, 3e-3]
    assert peft_comparison.rate_grid(3e-3) == [1e-3, 3e-3, 1e-2]
    assert peft_comparison.rate_grid(3e-2) == [1e-2, 3e-2, 1e-1]
    with pytest.raises(ValueError, match="1-3-10 grid"):
        peft_comparison.rate_grid(2e-3)
    mean, low, high = peft_comparison.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-3)
    assert peft_comparison.seed_interval([0.9, 0.9, 0.9]) == (0.9, 0.9, 0.9)


def test_overlapping_intervals_tie_and_separated_ones_rank():
    def row(method, low, mean, high):
        return {"method": method, "low": low, "accuracy": mean, "high": high, "learning_rate": 1e-3}

    summary = [row("a", 0.90, 0.95, 1.00), row("b", 0.85, 0.91, 0.905), row("c", 0.5, 0.6, 0.89)]
    top, tied, below = peft_comparison.ranking_tiers(summary)
    assert top["method"] == "a" and [r["method"] for r in tied] == ["b"]
    assert [r["method"] for r in below] == ["c"]
    assert "Tied at the top" in peft_comparison.ranking_sentence(summary)
    alone = peft_comparison.ranking_sentence([summary[0], summary[2]])
    assert alone.startswith("Ahead of every other method") and "below it, separated: c" in alone
