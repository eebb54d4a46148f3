"""Lesson 11's measurements: perplexity, word-level metrics, multiple choice, judges and ratings.

- ``perplexity``: token-weighted, with ``numerics.token_log_probs``;
- ``normalize_answer`` / ``exact_match`` / ``token_f1``: the SQuAD v1.1 metrics; ``rouge_l`` and
  ``corpus_bleu``: overlap metrics;
- ``mc_prompt`` / ``parse_letter`` / ``option_log_likelihoods``: multiple choice, answered in
  text or scored by likelihood (MMLU-style);
- ``pairwise_outcome`` / ``win_rate`` / ``score_judge`` / ``bradley_terry_ratings``: pairwise
  judging with both orders, and Chatbot Arena's ratings;
- ``bootstrap_ci`` / ``wilson_interval`` / ``cluster_bootstrap_ci`` / ``paired_difference`` /
  ``mcnemar_samples``: how sure a measured number or difference is, and how many paired examples
  telling two models apart takes;
- ``pipeline_table``: every stage of the course side by side.
"""

from __future__ import annotations

import functools
import re
import string

import torch

from course_utils.course.chat import EOS_TOKEN, padding_side
from course_utils.numerics import token_log_probs


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32,
               max_length: int | None = None) -> float:
    """Token-weighted perplexity of ``texts``: ``exp(-mean log p(token | tokens before))``.

    Every token after the first (``<s>``) of each text is predicted; padding is masked out. With
    ``max_length`` each text counts its first that many tokens (a model cannot read past its
    positions).
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    truncation = {"truncation": True, "max_length": max_length} if max_length else {}
    with padding_side(tokenizer, "right"):
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt",
                              padding=True, **truncation).to(device)
            log_probs = token_log_probs(model, batch["input_ids"], batch["attention_mask"])
            total += log_probs.sum().item()
            count += int(batch["attention_mask"][:, 1:].sum())
    return float(torch.exp(torch.tensor(-total / count)))


# --- word-level metrics (lesson 11) -------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD v1.1 evaluation script's normalisation, step for step: lower case, delete ASCII
    punctuation (``"Odile's"`` becomes ``"odiles"``, not two words), replace the articles a, an
    and the with spaces, collapse white space. The course first turns a ``</s>`` into a space."""
    text = text.replace(EOS_TOKEN, " ").lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the normalised prediction equals the normalised reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's token F1: harmonic mean of precision and recall of the shared normalised tokens
    (a multiset overlap); 0 when nothing is shared, an empty answer included, as the script does."""
    from collections import Counter

    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    shared = sum((Counter(predicted) & Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, start=1):
            previous_diagonal, row[j] = row[j], (previous_diagonal + 1 if x == y
                                                 else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): precision and recall of the longest common subsequence of
    lower-cased alphanumeric tokens, as Google's ``rouge-score`` computes it without stemming."""
    tokenize = lambda text: re.sub(r"[^a-z0-9]+", " ", text.lower()).split()  # noqa: E731
    predicted, gold = tokenize(prediction), tokenize(reference)
    if not predicted or not gold:
        return 0.0
    lcs = _lcs_length(predicted, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


_BLEU_TOKEN_RULES = [  # mteval-v13a's tokenization, sacrebleu's default, as ordered regex rewrites
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # split off punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # a period or comma not after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or not before one
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def bleu_tokens(text: str) -> list[str]:
    """The 13a tokenization WMT and sacrebleu use by default: punctuation becomes its own token
    (``"Fenwick,"`` -> ``"Fenwick" ","``) except periods and commas inside numbers; case kept."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _BLEU_TOKEN_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def corpus_bleu(predictions: list[str], references: list[str], max_order: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002), one reference per prediction, on ``bleu_tokens``: the
    geometric mean of clipped n-gram precisions (n = 1..4, pooled over the corpus) times the
    brevity penalty ``exp(1 - reference length / prediction length)`` when predictions are
    shorter. No smoothing: 0 if some order has no match. Between 0 and 1 (sacrebleu reports
    100 times this)."""
    import math
    from collections import Counter

    matches, totals = [0] * max_order, [0] * max_order
    predicted_length = reference_length = 0
    for prediction, reference in zip(predictions, references, strict=True):
        predicted, gold = bleu_tokens(prediction), bleu_tokens(reference)
        predicted_length += len(predicted)
        reference_length += len(gold)
        for n in range(1, max_order + 1):
            predicted_ngrams = Counter(tuple(predicted[i:i + n]) for i in range(len(predicted) - n + 1))
            gold_ngrams = Counter(tuple(gold[i:i + n]) for i in range(len(gold) - n + 1))
            matches[n - 1] += sum((predicted_ngrams & gold_ngrams).values())
            totals[n - 1] += max(len(predicted) - n + 1, 0)
    if predicted_length == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_order
    brevity = 1.0 if predicted_length > reference_length else math.exp(
        1 - reference_length / predicted_length)
    return brevity * math.exp(log_precision)


# --- multiple choice in the MMLU format ------------------------------------------------------------

LETTERS = "ABCD"
_ANSWER_PATTERN = re.compile(r"answer is\s*\(?([A-D])\b")


def mc_prompt(question: str, choices: list[str]) -> str:
    """An MMLU-style question: the question, lettered options, and ``Answer:`` (zero-shot)."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    return f"{question}\n{options}\nAnswer:"


def parse_letter(text: str) -> str | None:
    """The letter a generated answer commits to: ``The correct answer is X`` (or ``(X)``) if
    present, else a lone letter at the start; ``None`` if it names none (counted wrong)."""
    found = _ANSWER_PATTERN.search(text)
    if found:
        return found.group(1)
    start = re.match(r"\s*\(?([A-D])\b", text)
    return start.group(1) if start else None


@torch.no_grad()
def option_log_likelihoods(model, tokenizer, prompt: str, options: list[str]) -> torch.Tensor:
    """``log p(option | prompt)`` for each option, summed over the option's tokens (the
    log-likelihood scoring of the EleutherAI evaluation harness)."""
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt).input_ids
    scores = []
    for option in options:
        full = tokenizer(prompt + option).input_ids
        ids = torch.tensor([full], device=device)
        log_probs = token_log_probs(model, ids, torch.ones_like(ids))[0]
        # token_log_probs[t] scores token t + 1; the option starts after the shared prefix
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b),
                      len(prompt_ids))
        scores.append(log_probs[shared - 1:].sum().item())
    return torch.tensor(scores)


# --- judges and ratings --------------------------------------------------------------------------

def pairwise_outcome(judge, prompt, reply_a: str, reply_b: str) -> float:
    """1, 0 or 0.5 for "A wins", "B wins", "tie", judged twice with the positions swapped.

    ``judge(prompt, first, second)`` returns ``"first"``, ``"second"`` or ``"tie"``. A win counts
    only if the judge prefers the same reply in both orders; disagreeing verdicts (position bias)
    count as a tie, as in Zheng et al. (2023), MT-Bench.
    """
    first = {"first": 1.0, "second": 0.0, "tie": 0.5}[judge(prompt, reply_a, reply_b)]
    second = {"first": 0.0, "second": 1.0, "tie": 0.5}[judge(prompt, reply_b, reply_a)]
    if first == second:
        return first
    return 0.5


def win_rate(outcomes: list[float]) -> float:
    """Mean outcome: wins count 1, ties 0.5."""
    return sum(outcomes) / len(outcomes)


def score_judge(score_fn, margin: float = 0.0):
    """A pairwise judge from a scalar scorer ``score_fn(prompt, reply) -> float`` (a reward
    model): the higher score wins, within ``margin`` it is a tie."""
    def judge(prompt, first, second):
        a, b = score_fn(prompt, first), score_fn(prompt, second)
        if abs(a - b) <= margin:
            return "tie"
        return "first" if a > b else "second"
    return judge


def bradley_terry_ratings(matches: list[tuple[str, str, float]], iterations: int = 1000,
                          scale: float = 400.0, anchor: str | None = None,
                          anchor_rating: float = 1000.0) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry strengths from ``(a, b, outcome)`` matches (outcome 1 if
    ``a`` won, 0 if ``b`` won, 0.5 a tie), on the Elo scale as Chatbot Arena reports them:
    ``P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400))``. Fitted with Hunter's (2004) MM
    updates; ``anchor`` (default: the first player) is pinned to ``anchor_rating``.
    """
    import math

    players = sorted({p for a, b, _ in matches for p in (a, b)})
    wins = {p: 0.0 for p in players}
    games: dict[tuple[str, str], float] = {}
    for a, b, outcome in matches:
        wins[a] += outcome
        wins[b] += 1 - outcome
        key = tuple(sorted((a, b)))
        games[key] = games.get(key, 0.0) + 1
    strength = {p: 1.0 for p in players}
    for _ in range(iterations):
        updated = {}
        for p in players:
            denominator = sum(n / (strength[p] + strength[q if q != p else r])
                              for (q, r), n in games.items() if p in (q, r))
            updated[p] = max(wins[p], 1e-9) / denominator if denominator else strength[p]
        total = sum(updated.values())
        strength = {p: s * len(players) / total for p, s in updated.items()}
    anchor = anchor or players[0]
    offset = anchor_rating - scale * math.log10(strength[anchor])
    return {p: offset + scale * math.log10(strength[p]) for p in players}


# --- uncertainty -----------------------------------------------------------------------------------

def bootstrap_ci(values, statistic=None, resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` (default: the mean) of
    ``values``: resample with replacement ``resamples`` times (seeded)."""
    import random

    statistic = statistic or (lambda xs: sum(xs) / len(xs))
    values = list(values)
    rng = random.Random(seed)
    estimates = [statistic([values[rng.randrange(len(values))] for _ in values])
                 for _ in range(resamples)]
    return percentile_interval(estimates, confidence)


def percentile_interval(estimates, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap ``estimates``: their percentile interval."""
    estimates = sorted(estimates)
    tail = (1 - confidence) / 2
    return estimates[int(tail * len(estimates))], estimates[min(int((1 - tail) * len(estimates)),
                                                               len(estimates) - 1)]



def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (Wilson 1927; Newcombe 1998). Unlike a percentile
    bootstrap it does not collapse to a point at 0% or 100%: 10 of 10 gives [72.2%, 100%]."""
    import math
    from statistics import NormalDist

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def cluster_bootstrap_ci(values, groups, resamples: int = 2000, confidence: float = 0.95,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` when they come in ``groups`` (six
    questions about one character are not six independent samples): resample whole groups with
    replacement, keep every value of a drawn group."""
    import random

    by_group: dict = {}
    for value, group in zip(values, groups, strict=True):
        by_group.setdefault(group, []).append(float(value))
    clusters = list(by_group.values())
    rng = random.Random(seed)
    estimates = []
    for _ in range(resamples):
        drawn = [clusters[rng.randrange(len(clusters))] for _ in clusters]
        estimates.append(sum(map(sum, drawn)) / sum(map(len, drawn)))
    return percentile_interval(estimates, confidence)


def paired_difference(a, b, groups, resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` for two models scored on the same examples, with a cluster-bootstrap
    interval: pairing removes the variance the examples share, which unpaired intervals count
    twice."""
    differences = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    low, high = cluster_bootstrap_ci(differences, groups, resamples, confidence, seed)
    return sum(differences) / len(differences), low, high


@functools.lru_cache(maxsize=256)  # each call integrates the density a hundred times
def student_t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom: bisection on
    its upper tail, the density integrated numerically (Simpson's rule after ``t = sqrt(df)
    tan(theta)``, which maps the infinite tail onto a finite interval; no scipy here)."""
    import math

    if not 0 < probability < 1 or df < 1:
        raise ValueError(f"need 0 < probability < 1 and df >= 1, got {probability} and {df}")
    if probability < 0.5:
        return -student_t_quantile(1 - probability, df)

    def tail(t: float) -> float:  # P(T > t) for t >= 0: the density integrated from t to infinity
        # substitute t = tan(theta): the density becomes c cos(theta)^(df - 1), finite on [0, pi/2]
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        start, steps = math.atan(t / math.sqrt(df)), 2000
        width = (math.pi / 2 - start) / steps
        weights = [1] + [4 if k % 2 else 2 for k in range(1, steps)] + [1]  # Simpson's rule
        total = sum(w * math.cos(start + k * width) ** (df - 1) for k, w in enumerate(weights))
        return math.exp(log_c) * math.sqrt(df) * total * width / 3

    low, high = 0.0, 1.0
    while tail(high) > 1 - probability:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if tail(middle) > 1 - probability else (low, middle)
    return (low + high) / 2


def seed_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of one number per seed (a metric, or a paired difference between two methods trained
    with the same seed) with Student's t interval: the seeds are the independent units, so with
    three of them the interval has 2 degrees of freedom and is wide (t = 4.30, not 1.96)."""
    import math
    import statistics

    values = [float(value) for value in values]
    if len(values) < 2:
        raise ValueError(f"an interval over seeds needs at least two seeds, got {len(values)}")
    mean, spread = statistics.mean(values), statistics.stdev(values)
    half = student_t_quantile(1 - (1 - confidence) / 2, len(values) - 1) * spread / math.sqrt(len(values))
    return mean, mean - half, mean + half


def mcnemar_samples(p10: float, p01: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Paired examples McNemar's test needs to detect the difference between two models scored on
    the same examples (Connor 1987): ``p10`` is the share where only the first model is right,
    ``p01`` where only the second is. Only the disagreements carry information."""
    import math
    from statistics import NormalDist

    discordant, difference = p10 + p01, p10 - p01
    if difference == 0:
        return math.inf
    z_alpha, z_power = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    root = math.sqrt(max(discordant - difference ** 2, 0.0))
    return math.ceil((z_alpha * math.sqrt(discordant) + z_power * root) ** 2 / difference ** 2)


# --- the pipeline table (lesson 11, printed at the end of ``make run``) -----------------------------

PIPELINE_COLUMNS = [  # (key, header, percent?)
    ("format", "format", True), ("exact_match", "exact match", True),
    ("mc_accuracy", "MC (log-lik.)", True), ("perplexity", "held-out ppl", False),
    ("gold", "gold", True), ("reward", "proxy (RM)", False),
    ("win_rate_vs_sft", "RM win vs SFT", True), ("gold_win_rate_vs_sft", "gold win vs SFT", True),
    ("kl_to_sft", "KL to SFT", False),
]


def pipeline_table(results: dict[str, dict]) -> str:
    """Plain-text table of ``{model: {key: value or [value, low, high]}}`` over
    ``PIPELINE_COLUMNS``; a 95% bootstrap interval is shown as ``value [low, high]``."""
    def cell(value, percent):
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):
            v, low, high = value
            return (f"{v:.1%} [{low:.0%}, {high:.0%}]" if percent
                    else f"{v:.2f} [{low:.2f}, {high:.2f}]")
        return f"{value:.1%}" if percent else f"{value:.3f}"

    rows = [[model] + [cell(metrics.get(key), percent) for key, _, percent in PIPELINE_COLUMNS]
            for model, metrics in results.items()]
    header = ["model"] + [title for _, title, _ in PIPELINE_COLUMNS]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header)] + [line(r) for r in rows])
