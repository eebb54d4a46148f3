"""The T4 budget: lesson 01's memory model applied to every stage of the ``colab`` recipes.

For each phase of lessons 07-11 on TinyLlama-1.1B, the predicted peak GPU memory (the weights of
every model alive at that point of the notebook, the adapters with their gradients and optimizer
states, the activations at the recipe's batch x length with or without checkpointing, the logits)
and the predicted minutes. ``tests/test_budget.py`` fails when a phase exceeds ``LIMIT_GB`` or a
lesson ``LIMIT_MINUTES``; lesson 01 prints the table.

These are predictions from stated assumptions, not measurements (no session has had a T4 yet):

- **memory**: ``memory.activation_bytes`` (exact for fp32 on the CPU, an estimate in 16 bits), plus
  the logits in 16 bits and their fp32 copy and gradient in the loss, plus ``CUDA_CONTEXT_GB``
  that PyTorch does not count (the CUDA context and allocator slack);
- **time**: training FLOPs per token of ``2N`` forward, ``2N`` backward through frozen weights
  (adapters only: no weight gradients for the base) and another ``2N`` with checkpointing's
  recomputation, at ``T4_FP16_FLOPS`` x ``ASSUMED_UTILIZATION``; generation at
  ``DECODE_STEP_SECONDS`` per new token per batch (small batches on a T4 are bound by kernel
  launches and 4-bit dequantization, not by arithmetic);
- **lengths**: ``SEQUENCE_TOKENS``: chats fill the SFT recipe's ``max_length``; Orca sequences
  (prompt + reply) pad to about 512 tokens per batch; PPO prompts to their ``max_prompt_length``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from course_utils import memory
from course_utils.course.models import tinyllama_config
from course_utils.course.recipes import load_recipe

GB = 10**9
LIMIT_GB = 14.0                 # a T4 has 15 GB; keep 1 GB for fragmentation
LIMIT_MINUTES = 30.0            # a lesson on Colab's free tier
CUDA_CONTEXT_GB = 0.5
T4_FP16_FLOPS = 65e12           # NVIDIA T4 datasheet: 65 TFLOPS mixed-precision (FP16/FP32)
ASSUMED_UTILIZATION = 0.2       # of that peak, for Hugging Face training with 4-bit dequantization
DECODE_STEP_SECONDS = 0.03      # one generated token for a whole batch, 22 layers, 4-bit weights
SEQUENCE_TOKENS = {"chat": None, "pair_sequence": 512}  # None: the recipe's max_length


@dataclass(frozen=True)
class Phase:
    """One phase of a lesson: the models on the GPU, what trains, and for how long."""

    lesson: str
    name: str
    models: tuple            # (label, bytes) of every model alive on the GPU
    trainable: int = 0       # trainable parameters
    bytes_per_trainable: float = 0  # weight + gradient + optimizer state bytes
    activations: float = 0   # bytes saved for backward (or held by a forward pass)
    logits: float = 0        # bytes of logits and their fp32 copies
    seconds: float = 0.0

    @property
    def peak_gb(self) -> float:
        return (sum(size for _, size in self.models) + self.trainable * self.bytes_per_trainable
                + self.activations + self.logits) / GB + CUDA_CONTEXT_GB


def _config():
    return tinyllama_config()


def model_bytes(kind: str, config=None) -> float:
    """Bytes of TinyLlama on the GPU: ``nf4`` (linear layers in NF4 with double quantization, the
    rest in 16 bits), ``fp16``, or ``reward`` (16 bits, the LM head replaced by a scalar head)."""
    config = config or _config()
    n = memory.count_parameters(config)
    linear = config.num_hidden_layers * sum(
        a * b for a, b in memory.linear_shapes(config).values())
    if kind == "nf4":
        return linear * memory.nf4_bits_per_parameter() / 8 + (n - linear) * 2
    if kind == "fp16":
        return n * 2
    if kind == "reward":
        return (n - config.vocab_size * config.hidden_size + config.hidden_size) * 2
    raise ValueError(f"unknown model kind {kind!r}")


def lora_count(recipe, config=None) -> int:
    config = config or _config()
    targets = recipe.lora["target_modules"]
    if targets == "all-linear":
        targets = memory.LORA_TARGETS
    return memory.lora_parameters(config, recipe.lora["r"], targets)


def training_seconds(tokens: float, checkpointing: bool, reference_forward: bool = False,
                     config=None) -> float:
    """Seconds to train adapters on ``tokens`` tokens (plus a frozen reference's forward)."""
    n = memory.count_parameters(config or _config())
    flops_per_token = (4 + (2 if checkpointing else 0) + (2 if reference_forward else 0)) * n
    return tokens * flops_per_token / (T4_FP16_FLOPS * ASSUMED_UTILIZATION)


def forward_seconds(tokens: float, config=None) -> float:
    return tokens * 2 * memory.count_parameters(config or _config()) / (
        T4_FP16_FLOPS * ASSUMED_UTILIZATION)


def generation_seconds(prompts: int, batch_size: int, new_tokens: int, prompt_tokens: int) -> float:
    calls = -(-prompts // batch_size)
    return calls * new_tokens * DECODE_STEP_SECONDS + forward_seconds(prompts * prompt_tokens)


def _activations(config, batch, length, checkpointing, vocab=True):
    if not vocab:  # a scalar head: no vocabulary-wide log-softmax
        config = copy.deepcopy(config)
        config.vocab_size = 1
    return memory.activation_bytes(config, batch, length, activation_checkpointing=checkpointing,
                                   value_bytes=2)


def _logits(config, batch, length) -> float:
    # 16-bit logits, their fp32 copy in the loss and its gradient
    return batch * length * config.vocab_size * (2 + 4 + 4)


def course_phases() -> list[Phase]:
    """Every phase of lessons 07-11 with the colab recipes, in course order."""
    config = _config()
    sft, reward = load_recipe("sft", "colab"), load_recipe("reward", "colab")
    ppo, grpo = load_recipe("ppo", "colab"), load_recipe("grpo", "colab")
    dpo, evaluation = load_recipe("dpo", "colab"), load_recipe("evaluation", "colab")
    nf4, fp16, rm = model_bytes("nf4"), model_bytes("fp16"), model_bytes("reward")
    chat, policy = evaluation.chat, evaluation.policy
    pair_tokens = SEQUENCE_TOKENS["pair_sequence"]
    phases = []

    # lesson 07: QLoRA SFT, then the same with loss on all tokens, then merge and compare
    t = sft.training
    length = t["max_length"]
    sft_lora = lora_count(sft)
    # trl keeps a 4-bit model's adapters in bf16 (2 + 2 bytes); paged AdamW 32-bit: 8 bytes of state
    sft_train = dict(trainable=sft_lora, bytes_per_trainable=2 + 2 + 8,
                     activations=_activations(config, t["per_device_train_batch_size"], length,
                                              t["activation_checkpointing"]),
                     logits=_logits(config, t["per_device_train_batch_size"], length),
                     seconds=60 * rebuild_minutes("sft"))
    chat_eval = (forward_seconds(chat["eval_examples"] * chat["max_length"])
                 + generation_seconds(chat["eval_examples"], chat["batch_size"],
                                      chat["max_new_tokens"], chat["max_length"]))
    phases.append(Phase("07", "QLoRA SFT, replies only", (("NF4 TinyLlama", nf4),), **sft_train))
    phases.append(Phase("07", "QLoRA SFT, all tokens (the first model kept)",
                        (("NF4 SFT model", nf4 + sft_lora * 2), ("NF4 TinyLlama", nf4)), **sft_train))
    phases.append(Phase("07", "evaluate before/after (4 times), merge two ways and compare",
                        (("NF4 SFT models", 2 * (nf4 + sft_lora * 2)), ("fp16 reloaded", fp16),
                         ("fp16 merged", fp16), ("fp16 merged into the dequantized base", fp16)),
                        logits=chat["batch_size"] * chat["max_length"] * config.vocab_size * 2,
                        seconds=4 * chat_eval))

    # lesson 08: a reward model (16-bit weights, LoRA and score head in fp32)
    t = reward.training
    pairs = t["per_device_train_batch_size"]
    reward_tokens = t["max_steps"] * pairs * t["gradient_accumulation_steps"] * 2 * pair_tokens
    phases.append(Phase(
        "08", "reward model training", (("fp16 reward model", rm),),
        trainable=lora_count(reward) + config.hidden_size, bytes_per_trainable=4 + 4 + 8,
        activations=_activations(config, 2 * pairs, min(pair_tokens, t["max_length"]),
                                 t["activation_checkpointing"], vocab=False),
        seconds=training_seconds(reward_tokens, t["activation_checkpointing"])
        + 2 * forward_seconds(policy["max_prompts"] * 2 * pair_tokens)))

    # lesson 09: the course PPO (fp16 policy with LoRA; reference = adapter off), best-of-n, GRPO
    t = ppo.training
    sequence = t["max_prompt_length"] + t["max_new_tokens"]
    ppo_lora = lora_count(ppo)
    policy_eval = generation_seconds(policy["max_prompts"], policy["batch_size"],
                                     policy["max_new_tokens"], policy["max_prompt_length"]) \
        + 3 * forward_seconds(policy["max_prompts"] * (policy["max_prompt_length"]
                                                       + policy["max_new_tokens"]))
    ppo_memory = dict(trainable=ppo_lora + config.hidden_size + 1, bytes_per_trainable=4 + 4 + 8,
                      activations=_activations(config, t["minibatch_size"], sequence, False),
                      logits=t["minibatch_size"] * sequence * config.vocab_size * (2 + 4 + 4))
    phases.append(Phase("09", "PPO", (("fp16 reward model", rm), ("fp16 policy", fp16)),
                        seconds=60 * rebuild_minutes("ppo") + 2 * policy_eval, **ppo_memory))
    bon = ppo.best_of_n  # best-of-n: a pool of replies from the SFT policy (PPO's adapter off), scored
    pool_replies = bon["pool_size"] * bon["max_prompts"]
    reply_sequence = policy["max_prompt_length"] + policy["max_new_tokens"]
    pool_seconds = (generation_seconds(pool_replies, bon["batch_size"], policy["max_new_tokens"],
                                       policy["max_prompt_length"])
                    + forward_seconds(pool_replies * reply_sequence))
    pool_logits = bon["batch_size"] * reply_sequence * config.vocab_size * 2
    phases.append(Phase("09", "best-of-n pool (the PPO policy kept)",
                        (("fp16 reward model", rm), ("fp16 PPO policy", fp16)),
                        logits=pool_logits, seconds=pool_seconds))
    g = grpo.training
    completions = g["per_device_train_batch_size"]
    grpo_sequence = t["max_prompt_length"] + g["max_completion_length"]
    phases.append(Phase(
        "09", "GRPO (trl)", (("fp16 reward model", rm), ("fp16 PPO policy", fp16),
                             ("fp16 GRPO policy", fp16)),
        trainable=lora_count(grpo), bytes_per_trainable=4 + 4 + 8,
        activations=_activations(config, completions, grpo_sequence,
                                 g.get("activation_checkpointing", False)),
        logits=completions * grpo_sequence * config.vocab_size * (2 + 4 + 4),
        seconds=g["max_steps"] * (
            generation_seconds(completions, completions, g["max_completion_length"],
                               t["max_prompt_length"])
            + forward_seconds(2 * completions * grpo_sequence)
            + training_seconds(completions * grpo_sequence, g.get("activation_checkpointing", False)))
        + policy_eval))

    # lesson 10: QLoRA DPO (reference = adapter off), a beta sweep of two more runs and two IPO; each
    # run leaves the GPU once measured (models.release)
    t = dpo.training
    pairs = t["per_device_train_batch_size"]
    dpo_train_seconds = training_seconds(
        t["max_steps"] * pairs * t["gradient_accumulation_steps"] * 2 * pair_tokens,
        t["activation_checkpointing"], reference_forward=True)
    dpo_lora = lora_count(dpo)
    dpo_memory = dict(trainable=dpo_lora, bytes_per_trainable=2 + 2 + 4,  # bf16 adapters, AdamW
                      activations=_activations(config, 2 * pairs, min(pair_tokens, t["max_length"]),
                                               t["activation_checkpointing"]),
                      logits=_logits(config, 2 * pairs, min(pair_tokens, t["max_length"])))
    phases.append(Phase("10", "QLoRA DPO", (("fp16 reward model", rm), ("NF4 policy", nf4)),
                        seconds=dpo_train_seconds + 2 * policy_eval, **dpo_memory))
    variants = len(dpo.variants["sweep_betas"]) + len(dpo.variants["ipo_target_scales"])
    phases.append(Phase("10", f"beta sweep and IPO ({variants} runs, one on the GPU at a time)",
                        (("fp16 reward model", rm), ("NF4 DPO policy", nf4 + dpo_lora * 2),
                         ("NF4 policy", nf4)), seconds=variants * (dpo_train_seconds + policy_eval),
                        **dpo_memory))
    phases.append(Phase("10", "DPO vs PPO", (("fp16 reward model", rm), ("NF4 DPO policy", nf4),
                                             ("fp16 PPO model", fp16), ("fp16 SFT reference", fp16)),
                        seconds=policy_eval))

    # lesson 11: four models measured one at a time against the SFT reference and the judge
    benchmark = evaluation.benchmark
    mc_seconds = generation_seconds(benchmark["mc_examples"], 64, benchmark["letter_max_new_tokens"],
                                    256) + forward_seconds(benchmark["mc_examples"] * 8 * 256)
    phases.append(Phase("11", "base, SFT, PPO and DPO measured in turn",
                        (("fp16 reward model", rm), ("fp16 SFT reference", fp16),
                         ("fp16 model under test", fp16)),
                        logits=policy["batch_size"] * (policy["max_prompt_length"]
                                                       + policy["max_new_tokens"]) * config.vocab_size * 2,
                        seconds=4 * (mc_seconds + policy_eval
                                     + forward_seconds(60 * chat["max_length"]))))
    phases.append(Phase("11", "best-of-n pool from the SFT reference",
                        (("fp16 reward model", rm), ("fp16 SFT reference", fp16)),
                        logits=pool_logits, seconds=pool_seconds))
    return phases


def rebuild_minutes(stage: str) -> float:
    """Predicted minutes for a later lesson to rebuild ``stage`` on a T4: its training only (with
    the adapter merge), parents not included."""
    config = _config()
    if stage == "sft":
        t = load_recipe("sft", "colab").training
        return training_seconds(t["max_steps"] * t["per_device_train_batch_size"]
                                * t["gradient_accumulation_steps"] * t["max_length"],
                                t["activation_checkpointing"]) / 60
    if stage in ("reward", "dpo"):
        t = load_recipe(stage, "colab").training
        tokens = (t["max_steps"] * t["per_device_train_batch_size"]
                  * t["gradient_accumulation_steps"] * 2 * SEQUENCE_TOKENS["pair_sequence"])
        return training_seconds(tokens, t["activation_checkpointing"],
                                reference_forward=stage == "dpo") / 60
    if stage == "ppo":
        t = load_recipe("ppo", "colab").training
        sequence = t["max_prompt_length"] + t["max_new_tokens"]
        step = (generation_seconds(t["batch_size"], t["batch_size"], t["max_new_tokens"],
                                   t["max_prompt_length"])
                + 3 * forward_seconds(t["batch_size"] * sequence, config)
                + t["ppo_epochs"] * training_seconds(t["batch_size"] * sequence, False))
        return t["steps"] * step / 60
    raise ValueError(f"unknown stage {stage!r}")


def lesson_minutes(phases=None) -> dict[str, float]:
    minutes: dict[str, float] = {}
    for phase in phases or course_phases():
        minutes[phase.lesson] = minutes.get(phase.lesson, 0.0) + phase.seconds / 60
    return minutes


def budget_table(phases=None) -> str:
    """The budget as a printed table: peak GB and minutes per phase, minutes per lesson."""
    phases = phases or course_phases()
    lines = [f"{'lesson':6s} {'phase':54s} {'models on the GPU':>17s} {'peak GB':>8s} {'minutes':>8s}"]
    for phase in phases:
        lines.append(f"{phase.lesson:6s} {phase.name:54s} {len(phase.models):17d} "
                     f"{phase.peak_gb:8.1f} {phase.seconds / 60:8.1f}")
    totals = lesson_minutes(phases)
    lines.append("minutes per lesson: " + ", ".join(f"{k}: {v:.0f}" for k, v in totals.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(budget_table())
