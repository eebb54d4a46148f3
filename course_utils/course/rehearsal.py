"""The ``rehearsal`` profile: the T4 path of the course, run on a CPU.

``rehearsal`` runs exactly what ``colab`` runs (its recipes, the Hub data loaders and their
columns, truncation and batch sizes, the same models alive at once, the same evaluation code) with
three substitutions, and one way it is stricter than the CPU:

1. **the model**: a stand-in with TinyLlama-1.1B's architecture (32 query and 4 key/value heads,
   2,048 positions, the same module names), narrower and shallower, with random weights, built here
   in seconds (``build_standin``). Its tokenizer is the course model's, stripped of its chat
   template and padding token as TinyLlama's base checkpoint is, so the chat-setup code of the Hub
   path runs too. Its vocabulary is that tokenizer's, so that, as with TinyLlama and its own
   tokenizer, every row of the embedding is a token the tokenizer can produce; TinyLlama's 32,000
   rows would only make every logit row wider, which a CPU rehearsal pays for in time and does
   not measure;
2. **the data**: rows in the Hub data sets' schemas with realistic lengths, shipped in
   ``data/samples/rehearsal/`` (``write_samples`` made them; ``sample_statistics`` measures them,
   and ``data/samples/README.md`` states the numbers);
3. **the counts**: training steps and evaluation sizes capped by ``configs/recipes/rehearsal/caps.yaml``,
   which may only change counts (``recipes.CAPPABLE_KEYS``).

4. **the precision**, in the other direction: it computes as a T4 does, not as the CPU would
   like to. Weights and activations are fp16 where the colab recipes put them (``T4_DTYPE``:
   precision ``auto`` is fp16 on a T4), trainers run fp16 autocast with a gradient scaler (on the
   CPU accelerate would silently compute in fp32 without one), and ``install_guards`` fails where
   CUDA would and the CPU does not: a bf16 gradient reaching the fp16 scaler (``T4GradScaler``),
   and a forward pass whose logits at TinyLlama's real vocabulary would not fit beside the models
   (``LOGITS_LIMIT_GB``). An fp32 module fed fp16 outside autocast fails on the CPU as on CUDA.

It checks structure, not learning: no exception, metrics written, lengths respected, every
dropped or truncated row counted. Random weights learn nothing, so the lessons' claims about the
numbers print as warnings there (``COURSE_STRICT_CLAIMS`` stays off).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path

import torch

from course_utils.course.chat import render_chat
from course_utils.course.models import load_tokenizer, tinyllama_config
from course_utils.course.paths import COURSE_MODEL_DIR, SAMPLES_DIR, WORLD_DIR, artifacts_dir
from course_utils.course.recipes import load_recipe, rehearsal_scale

REHEARSAL_DATA_DIR = SAMPLES_DIR / "rehearsal"
#: the stand-in's shape: TinyLlama's heads, positions and names; width and depth reduced (bitsandbytes'
#: CPU kernel needs outputs in multiples of 32 and inputs in multiples of 64); the vocabulary is the
#: course tokenizer's (``standin_config``)
STANDIN_SHAPE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "head_dim": 8}
STANDIN_SEED = 0
FILES = {"sft_train": "ultrachat_200k_test_sft.jsonl", "sft_test": "ultrachat_200k_test_gen.jsonl",
         "preferences": "distilabel_intel_orca_dpo_pairs_train.jsonl", "mmlu": "mmlu_all_test.jsonl"}


def standin_dir() -> Path:
    full = rehearsal_scale() == "full"
    return artifacts_dir("models", "rehearsal-standin-full" if full else "rehearsal-standin")


def standin_config():
    """TinyLlama-1.1B's ``LlamaConfig`` with ``STANDIN_SHAPE``'s width and depth; at
    ``COURSE_REHEARSAL_SCALE=full`` (a GPU run, ``scripts/t4_check.py``) TinyLlama's own, its
    32,000-token vocabulary included (the course tokenizer's ids are all below it)."""

    config = tinyllama_config()
    if rehearsal_scale() == "full":
        config.course_rehearsal = True
        return config
    for key, value in STANDIN_SHAPE.items():
        setattr(config, key, value)
    config.vocab_size = json.loads((COURSE_MODEL_DIR / "config.json").read_text())["vocab_size"]
    # saved in config.json and inherited by every model trained from it: the guards check only these
    config.course_rehearsal = True
    return config


def build_standin(directory: Path | None = None) -> Path:
    """Save the stand-in model and its tokenizer to ``directory`` (default ``standin_dir()``), unless
    an identical one is already there. Deterministic: the same seed gives the same weights."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = Path(directory or standin_dir())
    config = standin_config()
    stamp = hashlib.sha256(json.dumps([config.to_dict(), STANDIN_SEED], sort_keys=True,
                                      default=str).encode()).hexdigest()
    marker = directory / "standin.sha256"
    if marker.exists() and marker.read_text() == stamp and (directory / "config.json").exists():
        return directory
    torch.manual_seed(STANDIN_SEED)
    model = LlamaForCausalLM(config)
    if rehearsal_scale() == "full":  # 1.1B weights: saved in the 16 bits they are loaded in
        model = model.to(T4_DTYPE)
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(COURSE_MODEL_DIR))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(directory)
    # as TinyLlama's base checkpoint: no chat template, no padding token
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    tokenizer_config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (directory / extra).unlink(missing_ok=True)
    marker.write_text(stamp)
    return directory


#: a T4 (Turing) has fp16 tensor cores and no bf16 arithmetic: precision "auto" is fp16 there
T4_DTYPE = torch.float16
#: the most fp32 logits one forward may produce at TinyLlama's vocabulary (32,000): a T4's 15 GB less
#: the three 16-bit 1.1B models a scoring phase keeps (6.6 GB), halved for the log-softmax copy
LOGITS_LIMIT_GB = 4.0
#: what CUDA's gradient scaler raises for a bf16 gradient (its unscale kernel has no bf16 version)
CUDA_BF16_UNSCALE_ERROR = ('"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for '
                           "'BFloat16'")


class RehearsalError(RuntimeError):
    """Something the T4 path would do that the rehearsal refuses: a sequence longer than
    TinyLlama's positions, a forward pass bigger than the recipes allow."""


#: the most sequences one forward pass may hold: the largest batch a colab recipe asks for
#: (trl's reward and DPO trainers stack chosen and rejected: twice the pairs)
_guard_state = {"installed": False}


def max_rows_per_forward() -> int:
    evaluation = load_recipe("evaluation", "colab")
    batches = [load_recipe("sft", "colab").training["per_device_train_batch_size"],
               2 * load_recipe("reward", "colab").training["per_device_train_batch_size"],
               2 * load_recipe("dpo", "colab").training["per_device_train_batch_size"],
               load_recipe("ppo", "colab").training["batch_size"],
               load_recipe("grpo", "colab").training["per_device_train_batch_size"],
               evaluation.chat["batch_size"], evaluation.policy["batch_size"]]
    return max(batches)


class T4GradScaler(torch.amp.GradScaler):
    """The CPU's fp16 gradient scaler, refusing what CUDA's refuses: a bf16 gradient (CUDA's unscale
    kernel has none; the CPU's accepts it). fp16 gradients are refused by torch itself on both."""

    def __init__(self, **kwargs):
        super().__init__("cpu", **kwargs)

    def unscale_(self, optimizer) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and parameter.grad.dtype == torch.bfloat16:
                    raise RehearsalError(
                        f"a bf16 gradient reached the fp16 gradient scaler; on a T4 CUDA raises "
                        f"NotImplementedError: {CUDA_BF16_UNSCALE_ERROR}. Keep trainable weights in fp32 "
                        "under fp16 (models.trainable_in_fp32_under_fp16)")
        super().unscale_(optimizer)


def logits_gb(rows: int, positions: int) -> float:
    """GB of fp32 logits for ``rows`` x ``positions`` at TinyLlama's vocabulary."""
    return rows * positions * tinyllama_config().vocab_size * 4 / 1e9


def _t4_mixed_precision_on_the_cpu() -> None:
    """accelerate, asked for fp16 on the CPU, computes in fp32 without autocast or a scaler; as a T4
    run it autocasts to fp16 and scales the loss with ``T4GradScaler``."""
    from accelerate import Accelerator

    original_init = Accelerator.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu" and self.scaler is None:
            self.native_amp = True
            self.scaler = T4GradScaler()

    Accelerator.__init__ = init


def install_guards() -> None:
    """Make every forward pass of the stand-in (and of the models trained from it) in this process
    check what a T4 run would hit: at most ``max_position_embeddings`` tokens per sequence
    (TinyLlama's 2,048), at most ``max_rows_per_forward()`` sequences, and logits at TinyLlama's
    vocabulary within ``LOGITS_LIMIT_GB``; and make fp16 trainers on the CPU compute as on a T4
    (``_t4_mixed_precision_on_the_cpu``). A violation raises ``RehearsalError`` naming the shape."""
    if _guard_state["installed"]:
        return
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaModel.forward
    original_causal = modeling_llama.LlamaForCausalLM.forward
    limit_rows = max_rows_per_forward()

    # functools.wraps keeps the forward's signature: generate() checks its keyword arguments against
    # it, and a bare (*args, **kwargs) makes it refuse `attention_mask` for every model in the process
    @functools.wraps(original)
    def guarded_forward(self, input_ids=None, *args, **kwargs):
        if not getattr(self.config, "course_rehearsal", False):  # any other model: untouched
            return original(self, input_ids, *args, **kwargs)
        shape = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape
        if shape[1] > self.config.max_position_embeddings:
            raise RehearsalError(
                f"a forward pass of {shape[1]} tokens per sequence; the model has "
                f"{self.config.max_position_embeddings} positions: truncate the input")
        if shape[0] > limit_rows:
            raise RehearsalError(
                f"a forward pass of {shape[0]} sequences; no colab recipe batches more than "
                f"{limit_rows}: split it into batches")
        return original(self, input_ids, *args, **kwargs)

    @functools.wraps(original_causal)
    def guarded_causal_forward(self, input_ids=None, *args, **kwargs):
        if getattr(self.config, "course_rehearsal", False):
            shape = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape
            kept = kwargs.get("logits_to_keep") or 0
            positions = kept if isinstance(kept, int) and kept > 0 else shape[1]
            size = logits_gb(shape[0], positions)
            if size > LOGITS_LIMIT_GB:
                raise RehearsalError(
                    f"a forward pass of {shape[0]} x {positions} positions: {size:.1f} GB of fp32 logits "
                    f"at TinyLlama's vocabulary, over the {LOGITS_LIMIT_GB} GB a T4 has room for: score "
                    "in smaller batches (the evaluation recipe's scoring section)")
        return original_causal(self, input_ids, *args, **kwargs)

    modeling_llama.LlamaModel.forward = guarded_forward
    modeling_llama.LlamaForCausalLM.forward = guarded_causal_forward
    _t4_mixed_precision_on_the_cpu()
    _guard_state["installed"] = True


def data_file(kind: str) -> Path:
    """The shipped stand-in for one Hub data set (``FILES``'s keys)."""
    path = REHEARSAL_DATA_DIR / FILES[kind]
    if not path.exists():
        raise FileNotFoundError(f"no rehearsal data at {path}; regenerate it with "
                                "`python -m course_utils.course.rehearsal`")
    return path


# --- the shipped rows ----------------------------------------------------------------------------

def _paragraphs() -> list[str]:
    return [p.strip().replace("\n", " ") for p in
            (WORLD_DIR / "corpus.txt").read_text().split("\n\n") if p.strip()]


def _text_of_tokens(tokenizer, paragraphs, rng, n_tokens: int) -> str:
    """World paragraphs joined until the text is ``n_tokens`` long (within one paragraph)."""
    parts, length = [], 0
    while length < n_tokens:
        paragraph = rng.choice(paragraphs)
        parts.append(paragraph)
        length += len(tokenizer(paragraph, add_special_tokens=False).input_ids) + 1
    return " ".join(parts)


def _ultrachat_rows(tokenizer, paragraphs, rng, n_rows: int, lengths: list[int]) -> list[dict]:
    rows = []
    for index in range(n_rows):
        total = lengths[index % len(lengths)]
        turns = rng.choice([1, 2, 3])
        messages = []
        for _ in range(turns):
            question = rng.choice(paragraphs).split(". ")[0] + "? Tell me more."
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant",
                             "content": _text_of_tokens(tokenizer, paragraphs, rng, total // turns)})
        prompt = messages[0]["content"]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                     "messages": messages})
    return rows


def _orca_rows(tokenizer, paragraphs, rng, n_rows: int) -> list[dict]:
    rows = []
    for index in range(n_rows):
        question = _text_of_tokens(tokenizer, paragraphs, rng, rng.randint(40, 300))
        # most replies a few hundred tokens; every eighth far longer than any recipe's limit
        long_reply = index % 8 == 7
        chosen = _text_of_tokens(tokenizer, paragraphs, rng,
                                 rng.randint(1200, 1600) if long_reply else rng.randint(60, 400))
        rejected = _text_of_tokens(tokenizer, paragraphs, rng, rng.randint(30, 300))
        status = "tie" if index % 10 == 3 else "unchanged"
        score = 7.0 if index % 10 == 5 else float(rng.choice([8, 9, 10]))
        rows.append({
            "system": "You are an AI assistant. Answer the question." if index % 3 else "",
            "input": question, "chosen": chosen, "rejected": rejected,
            "generations": [chosen, rejected], "order": ["chosen", "rejected"],
            "labelling_model": "gpt-4-1106-preview", "labelling_prompt": [],
            "raw_labelling_response": f"{score} 3.0", "rating": [score, 3.0],
            "rationale": "stand-in row written for the course", "status": status,
            "original_chosen": chosen, "original_rejected": rejected,
            "chosen_score": score, "in_gsm8k_train": index % 10 == 8})
    return rows


def _mmlu_rows(paragraphs, rng, n_rows: int) -> list[dict]:
    subjects = ["high_school_chemistry", "college_biology", "world_religions", "astronomy"]
    rows = []
    for _ in range(n_rows):
        choices = [rng.choice(paragraphs).split(". ")[0][:80] for _ in range(4)]
        rows.append({"question": rng.choice(paragraphs).split(". ")[0] + "?",
                     "subject": rng.choice(subjects), "choices": choices,
                     "answer": rng.randrange(4)})
    return rows


def write_samples(seed: int = 0) -> list[Path]:
    """Write ``data/samples/rehearsal/``: UltraChat chats of 1-2.6k tokens (a quarter over 2,048),
    Orca pairs of a few hundred tokens (every eighth far over the recipes' limits; ties, low scores
    and GSM8K rows for the filter to drop) and MMLU rows, all from the world's corpus."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(COURSE_MODEL_DIR))
    rng = random.Random(seed)
    paragraphs = _paragraphs()
    chat_lengths = [1000, 1300, 1600, 1900, 2300, 1200, 1500, 2600]
    tables = {"sft_train": _ultrachat_rows(tokenizer, paragraphs, rng, 32, chat_lengths),
              "sft_test": _ultrachat_rows(tokenizer, paragraphs, rng, 16, chat_lengths),
              "preferences": _orca_rows(tokenizer, paragraphs, rng, 80),
              "mmlu": _mmlu_rows(paragraphs, rng, 24)}
    REHEARSAL_DATA_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, rows in tables.items():
        path = REHEARSAL_DATA_DIR / FILES[kind]
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written.append(path)
    return written


def sample_statistics() -> dict:
    """Row counts and token lengths (course tokenizer, chat template applied) of the shipped rows."""

    tokenizer = load_tokenizer(COURSE_MODEL_DIR)

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    def rows(kind):
        return [json.loads(line) for line in data_file(kind).read_text().splitlines()]

    def summary(lengths, over):
        lengths = sorted(lengths)
        return {"rows": len(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2],
                "max": lengths[-1], **{f"over {limit}": sum(n > limit for n in lengths)
                                        for limit in over}}

    stats = {}
    for kind in ("sft_train", "sft_test"):
        stats[kind] = summary([n_tokens(render_chat(r["messages"])) for r in rows(kind)], [2048])
    pairs = rows("preferences")
    stats["preferences"] = summary(
        [n_tokens(render_chat([{"role": "user", "content": r["input"]},
                               {"role": "assistant", "content": r["chosen"]}])) for r in pairs],
        [1024])
    stats["preferences"]["kept by the filter"] = sum(
        r["status"] != "tie" and r["chosen_score"] >= 8 and not r["in_gsm8k_train"] for r in pairs)
    stats["mmlu"] = {"rows": len(rows("mmlu"))}
    return stats


if __name__ == "__main__":
    for written_path in write_samples():
        print(f"wrote {written_path}")
    print(json.dumps(sample_statistics(), indent=1))
