"""Lesson 11's metrics, judges, ratings and intervals against reference implementations."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from course_utils import evaluation


# The SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py, Rajpurkar et al. 2016), verbatim
# but for the Python 2 idioms, as the oracle.
def squad_normalize_answer(s):
    import string

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1_score(prediction, ground_truth):
    from collections import Counter

    prediction_tokens = squad_normalize_answer(prediction).split()
    ground_truth_tokens = squad_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


SQUAD_CASES = [
    ("The  Brass Compass!", "brass compass"), ("Odile's home", "odiles home"),
    ("Odile lives in Fenwick.", "Fenwick"), ("rock-and-roll", "rock and roll"), ("U.S.", "US"),
    ("the the cat", "cat the"), ("cat cat dog", "cat dog dog"), ("", ""), ("a", "dog"),
    ("Anna's theatre", "the atre"), ("  an   apple tart ", "Apple tart."), ("café — naïve", "cafe naive"),
]


@pytest.mark.parametrize("prediction, reference", SQUAD_CASES)
def test_normalisation_exact_match_and_f1_equal_the_squad_script(prediction, reference):
    assert evaluation.normalize_answer(prediction) == squad_normalize_answer(prediction)
    assert evaluation.exact_match(prediction, reference) == (
        squad_normalize_answer(prediction) == squad_normalize_answer(reference))
    assert evaluation.token_f1(prediction, reference) == pytest.approx(squad_f1_score(prediction, reference))


@pytest.mark.parametrize("seed", range(3))
def test_normalisation_equals_the_squad_script_on_random_text(seed):
    rng = random.Random(seed)
    pieces = ["Odile", "'s", "the", "An", "a", " ", "-", ".", ",", "!", "?", "(x)", "—", "café", "A.B.", "\t"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert evaluation.normalize_answer(text) == squad_normalize_answer(text), repr(text)


def test_the_end_of_sequence_token_is_not_part_of_an_answer():
    assert evaluation.normalize_answer("The  Brass Compass!</s>") == "brass compass"
    assert evaluation.exact_match("Fenwick.</s>", "fenwick")
    assert not evaluation.exact_match("Odile lives in Fenwick.", "Fenwick")


def random_sentences(seed, n=40):
    rng = random.Random(seed)
    words = ["Odile", "lives", "in", "Fenwick", "the", "brass", "compass", "is", "a", "fox", "."]
    make = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    return [(make(), make()) for _ in range(n)]


@pytest.mark.parametrize("seed", range(3))
def test_rouge_l_equals_google_rouge_score(seed):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for prediction, reference in random_sentences(seed):
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert evaluation.rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def punctuated_sentences(seed, n=60):
    """Sentences with punctuation glued to words, numbers with separators, dashes and entities:
    what a tokenizer must split (or keep) exactly as mteval-v13a does."""
    rng = random.Random(seed)
    words = ["Odile", "lives", "in", "Fenwick,", "Fenwick.", "the", "brass", "compass!", "(fox)", "Odile's",
             "3.5", "1,000", "2-3", "well-known", "a/b", "&amp;", "&quot;hi&quot;", "x-ray.", "9.", "end?"]
    make = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    return [(make(), make()) for _ in range(n)]


@pytest.mark.parametrize("seed", range(3))
def test_bleu_tokens_equal_sacrebleus_13a_tokenizer(seed):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    for prediction, reference in punctuated_sentences(seed):
        for text in (prediction, reference):
            assert evaluation.bleu_tokens(text) == tokenize(text).split()


@pytest.mark.parametrize("seed", range(3))
def test_corpus_bleu_equals_sacrebleu(seed):
    import sacrebleu

    pairs = punctuated_sentences(seed) + random_sentences(seed, n=20)
    predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
    # a few exact copies so that every n-gram order has matches
    predictions[:5] = references[:5]
    expected = sacrebleu.corpus_bleu(predictions, [references], smooth_method="none").score / 100
    assert expected > 0
    assert evaluation.corpus_bleu(predictions, references) == pytest.approx(expected, abs=1e-9)


def test_bleu_is_zero_without_four_gram_matches_and_one_for_copies():
    assert evaluation.corpus_bleu(["Odile lives in Oakhollow ."], ["Fenwick is home ."]) == 0.0
    text = "Odile lives in Fenwick near the river ."
    assert evaluation.corpus_bleu([text], [text]) == pytest.approx(1.0)


def test_parse_letter_reads_the_committed_answer():
    assert evaluation.parse_letter(" The correct answer is C.") == "C"
    assert evaluation.parse_letter("answer is (B)") == "B"
    assert evaluation.parse_letter(" D. mole") == "D"
    assert evaluation.parse_letter(" Odile is a fox.") is None


def test_option_log_likelihoods_equal_the_models_loss(course_model_and_tokenizer):
    """Summed log p(option | prompt) from the model's own cross-entropy on the option tokens."""
    model, tokenizer = course_model_and_tokenizer
    prompt, options = "Odile lives in", [" Fenwick.", " Oakhollow near the mill."]
    scores = evaluation.option_log_likelihoods(model, tokenizer, prompt, options)
    for option, score in zip(options, scores):
        ids = torch.tensor([tokenizer(prompt + option).input_ids])
        n_prompt = len(tokenizer(prompt).input_ids)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert score.item() == pytest.approx(-loss * (ids.shape[1] - n_prompt), rel=1e-4)


def test_perplexity_equals_exp_of_the_models_loss(course_model_and_tokenizer):
    model, tokenizer = course_model_and_tokenizer
    text = "Odile lives in Fenwick and treasures a brass compass."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert evaluation.perplexity(model, tokenizer, [text]) == pytest.approx(expected, rel=1e-5)


def test_position_swapping_turns_a_position_bias_into_ties():
    always_first = lambda prompt, first, second: "first"  # noqa: E731
    assert evaluation.pairwise_outcome(always_first, "q", "x", "y") == 0.5
    by_length = evaluation.score_judge(lambda prompt, reply: len(reply))
    assert evaluation.pairwise_outcome(by_length, "q", "longer", "short") == 1.0
    assert evaluation.pairwise_outcome(by_length, "q", "short", "longer") == 0.0
    assert evaluation.pairwise_outcome(by_length, "q", "same", "size") == 0.5
    assert evaluation.win_rate([1.0, 0.0, 0.5, 0.5]) == 0.5


def test_bradley_terry_ratings_match_the_two_player_closed_form():
    matches = [("a", "b", 1.0)] * 30 + [("a", "b", 0.0)] * 10
    ratings = evaluation.bradley_terry_ratings(matches, anchor="b")
    assert ratings["b"] == pytest.approx(1000.0)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(30 / 10), abs=1e-3)


def test_bradley_terry_ratings_recover_known_strengths():
    rng = random.Random(0)
    truth = {"base": 800.0, "sft": 1000.0, "ppo": 1150.0, "dpo": 1100.0}
    matches = []
    for _ in range(6000):
        a, b = rng.sample(sorted(truth), 2)
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        matches.append((a, b, float(rng.random() < p)))
    ratings = evaluation.bradley_terry_ratings(matches, anchor="sft")
    for player, rating in truth.items():
        assert ratings[player] == pytest.approx(rating, abs=30)


def test_bootstrap_interval_covers_the_normal_approximation_for_a_proportion():
    values = [1.0] * 70 + [0.0] * 30
    low, high = evaluation.bootstrap_ci(values, resamples=4000, seed=1)
    half_width = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert low == pytest.approx(0.7 - half_width, abs=0.02)
    assert high == pytest.approx(0.7 + half_width, abs=0.02)
    assert evaluation.bootstrap_ci(values, seed=1) == evaluation.bootstrap_ci(values, seed=1)


def test_mmlu_rows_from_the_hub_schema_sample():
    from course_utils.course import data

    rows = data.load_mmlu_subset(10, data.MMLU_SAMPLE)
    assert len(rows) == 3
    by_question = {r["question"]: r for r in rows}
    insulin = by_question["Which organ produces insulin?"]
    assert insulin["answer"] == "D" and insulin["choices"][3] == "Pancreas"
    with pytest.raises(data.DataFormatError, match="answer"):
        data.mmlu_row({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4})


def test_fresh_biographies_are_new_text_about_the_requested_characters():
    from course_utils.course import world

    the_world = world.generate_world()
    corpus = set(world.build_corpus(the_world))
    held_out = the_world.held_out_characters[:3]
    passages = world.fresh_biographies(the_world, held_out, 4, seed=7)
    assert len(passages) == 12 and not set(passages) & corpus
    for i, passage in enumerate(passages):
        assert held_out[i // 4].name in passage


def test_pipeline_table_shows_intervals_and_make_run_prints_it(tmp_path, capsys):
    import json

    from course_utils.notebook_tools import run_notebooks

    results = {"SFT": {"exact_match": [0.975, 0.94, 1.0], "perplexity": 5.7, "win_rate_vs_sft": None},
               "DPO": {"exact_match": [1.0, 1.0, 1.0], "perplexity": 5.26}}
    table = evaluation.pipeline_table(results)
    lines = table.splitlines()
    assert lines[0].split()[0] == "model" and len(lines) == 3
    assert "97.5% [94%, 100%]" in lines[1] and "5.700" in lines[1]
    path = tmp_path / "pipeline.json"
    assert not run_notebooks.print_pipeline_table(path)
    path.write_text(json.dumps(results))
    assert run_notebooks.print_pipeline_table(path)
    assert "97.5% [94%, 100%]" in capsys.readouterr().out


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634),  # the closed form's special cases
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Table I, method 3
])
def test_wilson_interval_equals_the_published_values(successes, n, low, high):
    assert evaluation.wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="successes"):
        evaluation.wilson_interval(11, 10)


def test_the_cluster_bootstrap_is_wider_when_values_move_together():
    """Six values per group that are equal within a group carry one group's worth of information:
    resampling groups must give a wider interval than resampling the values one by one."""
    rng = random.Random(3)
    group_values = [float(rng.random() < 0.7) for _ in range(20)]
    values = [v for v in group_values for _ in range(6)]
    groups = [g for g in range(20) for _ in range(6)]
    low_c, high_c = evaluation.cluster_bootstrap_ci(values, groups, seed=1)
    low_i, high_i = evaluation.bootstrap_ci(values, seed=1)
    assert high_c - low_c > 1.5 * (high_i - low_i)
    # with one value per group it is the ordinary bootstrap's interval
    assert evaluation.cluster_bootstrap_ci(values, range(len(values)), seed=1) == pytest.approx(
        (low_i, high_i), abs=0.03)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    values = [1, 0, 1, 1, 0, 1]
    assert evaluation.paired_difference(values, values, [0, 0, 1, 1, 2, 2]) == (0.0, 0.0, 0.0)


def test_mcnemar_sample_size_gives_its_power_in_simulation():
    """The oracle is a simulation: at the computed n, McNemar's test (normal approximation, 5%)
    rejects in about 80% of seeded trials."""
    from statistics import NormalDist

    p10, p01 = 0.15, 0.05
    n = evaluation.mcnemar_samples(p10, p01)
    rng = random.Random(0)
    critical = NormalDist().inv_cdf(0.975)
    rejected = 0
    trials = 2000
    for _ in range(trials):
        b = c = 0
        for _ in range(n):
            u = rng.random()
            b += u < p10
            c += p10 <= u < p10 + p01
        rejected += b + c > 0 and abs(b - c) / math.sqrt(b + c) > critical
    assert 0.75 <= rejected / trials <= 0.85, (n, rejected / trials)
    assert evaluation.mcnemar_samples(0.1, 0.1) == math.inf


@pytest.mark.parametrize("probability", [0.6, 0.9, 0.975, 0.995])
def test_student_t_quantiles_equal_the_closed_forms(probability):
    # df 1 is Cauchy's; df 2 and 4 have closed forms (Hill 1970, "Algorithm 396")
    assert evaluation.student_t_quantile(probability, 1) == pytest.approx(
        math.tan(math.pi * (probability - 0.5)), rel=1e-6)
    assert evaluation.student_t_quantile(probability, 2) == pytest.approx(
        (2 * probability - 1) / math.sqrt(2 * probability * (1 - probability)), rel=1e-6)
    alpha = 4 * probability * (1 - probability)
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    assert evaluation.student_t_quantile(probability, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-6)
    assert evaluation.student_t_quantile(1 - probability, 4) == pytest.approx(-2 * math.sqrt(q - 1),
                                                                             rel=1e-6)


@pytest.mark.parametrize("df, probability, published", [(10, 0.975, 2.228), (30, 0.995, 2.750),
                                                         (5, 0.95, 2.015), (100000, 0.975, 1.960)])
def test_student_t_quantiles_equal_the_printed_tables(df, probability, published):
    assert round(evaluation.student_t_quantile(probability, df), 3) == published


def test_a_seed_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        _, low, high = evaluation.seed_interval([rng.gauss(1.0, 0.3) for _ in range(3)])
        covered += low <= 1.0 <= high
    assert abs(covered / trials - 0.95) < 3 * math.sqrt(0.95 * 0.05 / trials)
    with pytest.raises(ValueError, match="at least two seeds"):
        evaluation.seed_interval([0.5])
