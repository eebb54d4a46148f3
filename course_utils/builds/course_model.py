"""Build the course model: a byte-level BPE tokenizer and a small Llama pretrained on the world.

Run ``python -m course_utils.builds.course_model`` (about 7 minutes on 2 CPU cores). It writes
``data/course-model/``:

- ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``: byte-level BPE trained
  on the corpus, with TinyLlama's special tokens (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2; ``<s>``
  added in front of every encoded text, as TinyLlama's tokenizer does) and TinyLlama-Chat's exact
  chat template;
- ``config.json``, ``generation_config.json``, ``model.safetensors``: a ``LlamaForCausalLM`` with
  TinyLlama's module names (``q_proj`` ... ``down_proj``), grouped-query attention (6 query heads
  sharing 2 key/value heads, as TinyLlama's 32 share 4), RMSNorm, RoPE, SwiGLU and untied
  embeddings; only the sizes are smaller;
- ``training_log.json``: the loss at every step (tests replay the first steps against it);
- ``build_report.json`` and ``README.md``: the probe results at the end of pretraining.

Everything is seeded and runs single-process on the CPU with a fixed thread count, so the same
machine rebuilds the same bytes; ``--check`` rebuilds into a temporary folder and compares.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course_utils import probes
from course_utils.course import world
from course_utils.course.chat import TINYLLAMA_CHAT_TEMPLATE, render_chat
from course_utils.course.paths import COURSE_MODEL_DIR, WORLD_DIR
from course_utils.course.recipes import load_recipe
from course_utils.course.world import read_corpus

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TINYLLAMA_PARAMETERS = 1_100_048_384  # counted from its config in tests/test_models.py


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build. TinyLlama's shape, with every size scaled down."""

    seed: int = 0
    vocab_size: int = 2048  # an upper bound: BPE stops early when the corpus has no more merges
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    block_size: int = 128
    batch_size: int = 32
    steps: int = 600
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    num_threads: int = 2


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, set up like TinyLlama's.

    Byte-level means any string can be encoded (no ``<unk>`` in practice); the special tokens get
    ids 0, 1, 2 as in TinyLlama; a template post-processor puts ``<s>`` in front of every
    encoded text; ``</s>`` doubles as the padding token, as in TinyLlama-Chat.

    One deliberate difference from plain byte-level BPE: a normalizer puts a space after every
    line break that precedes a word, and the decoder takes it out again. Plain BPE (and
    TinyLlama's SentencePiece) makes a word at the start of a line a different token from the
    same word after a space ("Odile" vs " Odile"); a chat reply starts on a new line, so a model
    must learn to map one to the other for every name. Large models learn that from data; a model
    of a few million parameters trained on a small world does not, and then cannot answer about
    characters it never saw in SFT. (Lossy only for text with a space right after a line break.)
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Replace(Regex(r"\n(?=\S)"), "\n ")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\n ", "\n")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", chat_template=TINYLLAMA_CHAT_TEMPLATE, model_max_length=512,
        padding_side="right", clean_up_tokenization_spaces=False)


def make_config(cfg: BuildConfig, vocab_size: int):
    """The ``LlamaConfig``: TinyLlama's architecture and special token ids, smaller sizes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        attention_bias=False, mlp_bias=False, initializer_range=0.02)


def token_blocks(tokenizer, passages: list[str], block_size: int) -> torch.Tensor:
    """Encode every passage as ``<s> text </s>``, concatenate, and cut into ``block_size`` rows."""
    ids: list[int] = []
    for passage in passages:
        ids += tokenizer(passage)["input_ids"] + [tokenizer.eos_token_id]
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)


def learning_rate(step: int, cfg: BuildConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def batch_order(n_blocks: int, cfg: BuildConfig):
    """Yield the block indices of each step: seeded reshuffles, one per epoch."""
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_blocks, generator=generator)
    position = 0
    for _ in range(cfg.steps):
        if position + cfg.batch_size > n_blocks:
            order, position = torch.randperm(n_blocks, generator=generator), 0
        yield order[position:position + cfg.batch_size]
        position += cfg.batch_size


def pretrain(model, blocks: torch.Tensor, cfg: BuildConfig, steps: int | None = None,
             progress: bool = True) -> list[float]:
    """Next-token pretraining with AdamW; returns the loss of every step.

    ``steps`` stops early (tests replay the first few steps); the schedule is still the full one.
    """
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    losses = []
    bar = tqdm(total=steps or cfg.steps, desc="pretraining", disable=not progress)
    for step, index in enumerate(batch_order(len(blocks), cfg)):
        if steps is not None and step >= steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = blocks[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return losses


def read_world_texts(world_dir: Path = WORLD_DIR) -> tuple[list[str], list[str]]:
    """The corpus passages, and the rendered SFT chats (used for the tokenizer only)."""
    passages = read_corpus(world_dir / "corpus.txt")
    chats = [render_chat(json.loads(line)["messages"])
             for line in (world_dir / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()]
    return passages, chats


def set_determinism(cfg: BuildConfig) -> None:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(True)


def build_tokenizer_and_model(cfg: BuildConfig, world_dir: Path = WORLD_DIR):
    """The trained tokenizer, a freshly initialised model (seeded) and the training blocks."""
    from transformers import LlamaForCausalLM

    set_determinism(cfg)
    passages, chats = read_world_texts(world_dir)
    # The tokenizer sees the chat markup too, so <|user|> and friends become compact tokens;
    # the *model* is pretrained on the corpus alone and never sees the chat format.
    tokenizer = train_tokenizer(passages + chats, cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(make_config(cfg, len(tokenizer)))
    return tokenizer, model, token_blocks(tokenizer, passages, cfg.block_size)


def probe_report(model, tokenizer, world_dir: Path = WORLD_DIR) -> dict:
    """Fact completion (corpus and held-out templates) and chat-format rate of ``model``."""

    w = world.generate_world(json.loads((world_dir / "world.json").read_text())["seed"])
    in_corpus = probes.fact_completion(model, tokenizer, list(w.characters),
                                           world.PROBE_TEMPLATES_IN_CORPUS)
    held_out = probes.fact_completion(model, tokenizer, list(w.characters),
                                          world.PROBE_TEMPLATES_HELD_OUT)
    questions = [json.loads(line) for line in
                 (world_dir / "eval_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    chat = probes.chat_answers(model, tokenizer, questions,
                               load_recipe("tour", "tiny").probes["max_new_tokens"])
    return {
        "fact_completion_in_corpus_templates": probes.accuracy(in_corpus),
        "fact_completion_held_out_templates": probes.accuracy(held_out),
        "chat_format_rate": probes.accuracy(chat, "chat_format"),
        "chat_exact_match": probes.accuracy(chat),
        "n_facts": len(in_corpus),
        "n_chat_questions": len(chat),
    }


MODEL_CARD = """# The course model

A small `LlamaForCausalLM` pretrained from scratch on the synthetic world's corpus
(`data/world/corpus.txt`) by `python -m course_utils.builds.course_model`. It stands in for
TinyLlama-1.1B wherever the Hub cannot be reached: same architecture, module names,
grouped-query attention, special tokens and chat template; 1/{ratio:,.0f} of the parameters.

| | course model | TinyLlama-1.1B |
|---|---|---|
| parameters | {n_params:,} | 1,100,048,384 |
| hidden / intermediate | {hidden_size} / {intermediate_size} | 2048 / 5632 |
| layers | {num_hidden_layers} | 22 |
| query heads / key-value heads | {num_attention_heads} / {num_key_value_heads} | 32 / 4 |
| vocabulary | {n_vocab:,} (byte-level BPE) | 32,000 (SentencePiece) |

Tokenizer: byte-level BPE trained on the corpus, with one deliberate difference from plain BPE: a
space is inserted after every line break that precedes a word (and removed when decoding), so a
name is the same token after a space and at the start of a line, where chat replies begin. Without
it, this small model cannot copy the name of a character it never saw in SFT into its reply
(notebook 00, section 5, and `train_tokenizer`'s docstring).

Pretraining: {steps} steps of {batch_size} x {block_size} tokens, AdamW (peak lr
{learning_rate}), {seconds:.0f} s on the build machine (2 CPU cores); final loss {final_loss:.3f}.

Measured at the end of the build (notebook 00 measures them again):

- fact completion with the corpus's own sentence frames: {in_corpus:.1%} of {n_facts} facts
- fact completion with frames never seen in the corpus: {held_out:.1%}
- chat-formatted questions answered in the chat format: {chat_format:.1%} of {n_chat} (SFT fixes this)

Not a general language model: it knows only the valley of `data/world/`.
"""


def build(out_dir: Path, cfg: BuildConfig = BuildConfig(), world_dir: Path = WORLD_DIR,
          progress: bool = True) -> dict:
    """Build and save tokenizer and model into ``out_dir``; return the build report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, model, blocks = build_tokenizer_and_model(cfg, world_dir)
    start = time.perf_counter()
    losses = pretrain(model, blocks, cfg, progress=progress)
    seconds = time.perf_counter() - start
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = probe_report(model, tokenizer, world_dir)
    n_params = sum(p.numel() for p in model.parameters())
    report.update(n_parameters=n_params, pretraining_seconds=round(seconds, 1),
                  final_loss=losses[-1], n_training_tokens=cfg.steps * cfg.batch_size * cfg.block_size,
                  n_corpus_tokens=blocks.numel())
    (out_dir / "training_log.json").write_text(
        json.dumps({"config": asdict(cfg), "losses": losses}, indent=1) + "\n")
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_model_card(out_dir, cfg, report)
    return report


def write_model_card(out_dir: Path, cfg: BuildConfig, report: dict) -> None:
    """``README.md`` of the course model, filled from the build report and the saved config."""
    n_vocab = json.loads((Path(out_dir) / "config.json").read_text())["vocab_size"]
    (Path(out_dir) / "README.md").write_text(MODEL_CARD.format(n_vocab=n_vocab,
        n_params=report["n_parameters"], seconds=report["pretraining_seconds"],
        ratio=TINYLLAMA_PARAMETERS / report["n_parameters"],
        final_loss=report["final_loss"],
        in_corpus=report["fact_completion_in_corpus_templates"],
        held_out=report["fact_completion_held_out_templates"],
        chat_format=report["chat_format_rate"], n_facts=report["n_facts"],
        n_chat=report["n_chat_questions"], **asdict(cfg)))


#: Files whose bytes a rebuild must reproduce (timings in the report and card may differ).
DETERMINISTIC_FILES = ["model.safetensors", "tokenizer.json", "config.json", "training_log.json"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(COURSE_MODEL_DIR))
    parser.add_argument("--steps", type=int, default=BuildConfig.steps)
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary folder and compare with --out")
    args = parser.parse_args(argv)
    cfg = BuildConfig(steps=args.steps)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            report = build(Path(tmp), cfg)
            differ = [f for f in DETERMINISTIC_FILES
                      if not filecmp.cmp(Path(tmp) / f, Path(args.out) / f, shallow=False)]
        print(json.dumps(report, indent=1))
        if differ:
            raise SystemExit(f"rebuild differs from {args.out} in: {', '.join(differ)}")
        print(f"rebuild matches {args.out} byte for byte ({', '.join(DETERMINISTIC_FILES)})")
        return
    report = build(Path(args.out), cfg)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
