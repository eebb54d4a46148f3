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

import argparse
import contextlib
import functools
import hashlib
import json
import warnings
from dataclasses import dataclass

import torch

from course_utils import dpo, memory, ppo
from course_utils.course import gpu_trace
from course_utils.course.models import tinyllama_config
from course_utils.course.paths import REPO_ROOT
from course_utils.course.recipes import RECIPES_DIR, load_recipe
from course_utils.rollouts import response_logprobs

GB = 10**9
LIMIT_GB = 14.0                 # a T4 has 15 GB; keep 1 GB for fragmentation
LIMIT_MINUTES = 30.0            # a lesson on Colab's free tier
CUDA_CONTEXT_GB = 0.5
T4_FP16_FLOPS = 65e12           # NVIDIA T4 datasheet: 65 TFLOPS mixed-precision (FP16/FP32)
ASSUMED_UTILIZATION = 0.2       # of that peak, for Hugging Face training with 4-bit dequantization
DECODE_STEP_SECONDS = 0.03      # one generated token for a whole batch, 22 layers, 4-bit weights
SEQUENCE_TOKENS = {"chat": None, "pair_sequence": 512}  # None: the recipe's max_length
#: Orca pairs on the Hub: the data set card's filter keeps 5.92k of 12,859 rows, a tenth is held out
#: (as the filtered copy Filippo/distilabel-intel-orca-dpo-pairs-filtered splits it: 5.33k and 593)
HELD_OUT_PAIRS = 593
TRAIN_PAIRS = 5_330


@dataclass(frozen=True)
class Phase:
    """One phase of a lesson: the models on the GPU, what trains, the step at its peak, how long."""

    lesson: str
    name: str
    models: tuple            # (label, bytes) of every model alive on the GPU
    trainable: int = 0       # trainable parameters
    bytes_per_trainable: float = 0  # fp32 weight and AdamW's two fp32 states (gradients: see below)
    activations: float = 0   # bytes every layer keeps for backward through the whole step
    working: float = 0       # the most alive at once on top: one layer's backward, or the logits
    seconds: float = 0.0

    @property
    def peak_gb(self) -> float:
        return (sum(size for _, size in self.models) + self.trainable * self.bytes_per_trainable
                + self.activations + self.working) / GB + CUDA_CONTEXT_GB


def _config():
    return tinyllama_config()


def model_bytes(kind: str, config=None) -> float:
    """Bytes of TinyLlama on the GPU: ``nf4`` (linear layers in NF4 with double quantization, the
    rest in 16 bits, as ``from_pretrained`` loads it), ``nf4_prepared`` (the same after
    ``prepare_model_for_kbit_training``, which casts every 16-bit weight that is not 4-bit, the
    embeddings and the LM head among them, to fp32: what lessons 07 and 10 train and keep),
    ``fp16``, or ``reward`` (16 bits, the LM head replaced by a scalar head)."""
    config = config or _config()
    n = memory.count_parameters(config)
    linear = memory.linear_layer_parameters(config)
    if kind in ("nf4", "nf4_prepared"):
        return linear * memory.nf4_bits_per_parameter() / 8 + (n - linear) * (2 if kind == "nf4" else 4)
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


# --- memory: counted, except one decoder layer's working set, traced on one layer ----------------

#: trl's fused LM head (``trl.kernels.chunked_logprob``): tiles of this many scored tokens x vocabulary
FUSED_TILE = (4096, 32768)


def sequence_logits(config, rows, positions, fp32_head: bool) -> float:
    """``dpo.sequence_logprobs`` (and lesson 07's held-out loss) outside autocast: every position's
    logits (fp32 from an fp32 LM head, else 16-bit with an fp32 copy) and their log-softmax."""
    return rows * positions * config.vocab_size * ((4 if fp32_head else 2 + 4) + 4)


def response_logits(config, rows, positions, reply, fp32_head: bool) -> float:
    """``rollouts.response_logprobs``: every position's logits, the reply's in fp32 divided by the
    temperature, and their log-softmax."""
    return (rows * positions * config.vocab_size * (4 if fp32_head else 2)
            + rows * reply * config.vocab_size * (4 + 4))


def fused_head(config, tokens, fp32_head: bool) -> float:
    """trl 1.16's fused LM head in training (``add_fused_lm_head``): no logits for the batch, one
    16-bit tile at a time, the LM head's 16-bit copy when it is stored in fp32 (QLoRA's prepared
    model), and the scored hidden states' fp32 gradient."""
    tile = min(tokens, FUSED_TILE[0]) * min(config.vocab_size, FUSED_TILE[1]) * 2
    head_copy = config.vocab_size * config.hidden_size * 2 if fp32_head else 0
    return tile + head_copy + tokens * config.hidden_size * (2 + 4)


@functools.cache
def _layer(stage: str, nf4: bool, head: str, autocast: bool, grad: bool, config_json: str) -> tuple:
    """One decoder layer of the model a stage trains (or scores with), traced at two lengths under
    fake tensors (``gpu_trace.layer_bytes_per_token``): ``(kept per token, working set's fixed
    bytes, working set per token)``. The working set has a part that does not grow with the tokens
    (a 4-bit layer's dequantized weights)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**json.loads(config_json))
    config.num_hidden_layers = 1
    recipe = load_recipe(stage, "colab")
    model = _meta_trainable(config, recipe, nf4=nf4, head=head) if grad else \
        _meta_frozen(config, "nf4" if nf4 else head if head == "reward" else "fp16")
    residual = torch.float32 if nf4 else torch.float16
    with gpu_trace.fake_tensors():
        gpu_trace.materialize(model)
        model.train(grad)
        short, long = (gpu_trace.layer_bytes_per_token(model, residual, autocast, tokens, grad=grad)
                       for tokens in (256, 1024))
    per_token = (long["peak"] * 1024 - short["peak"] * 256) / (1024 - 256)
    return long["saved"], short["peak"] * 256 - per_token * 256, per_token


def layer_bytes(stage: str, config, *, nf4: bool, head: str = "causal", autocast: bool = True,
                grad: bool = True) -> tuple:
    return _layer(stage, nf4, head, autocast, grad, json.dumps(config.to_dict(), sort_keys=True))


def training_working(stage, config, rows, length, *, nf4, head="causal", autocast=True,
                     checkpointing=True, logits=0.0) -> dict:
    """``activations`` and ``working`` of a training step on ``rows`` x ``length`` tokens: every
    layer keeps its checkpointed input (or, without checkpointing, all it saves); at the peak one
    layer's backward, or the logits and their gradient, whichever is larger."""
    kept, fixed, per_token = layer_bytes(stage, config, nf4=nf4, head=head, autocast=autocast)
    tokens = rows * length
    if checkpointing:
        return {"activations": config.num_hidden_layers * tokens * kept,
                "working": max(fixed + tokens * per_token, logits)}
    return {"activations": config.num_hidden_layers * tokens * kept,
            "working": fixed + tokens * (per_token - kept) + logits}


def course_phases(config=None) -> list[Phase]:
    """Every phase of lessons 07-11 with the colab recipes, in course order (``config`` replaces
    TinyLlama's, as the tests' traces of a shallower TinyLlama do)."""
    config = config or _config()
    sft, reward = load_recipe("sft", "colab"), load_recipe("reward", "colab")
    ppo_recipe, grpo = load_recipe("ppo", "colab"), load_recipe("grpo", "colab")
    dpo_recipe, evaluation = load_recipe("dpo", "colab"), load_recipe("evaluation", "colab")
    nf4, fp16, rm = (model_bytes(kind, config) for kind in ("nf4_prepared", "fp16", "reward"))
    chat, policy, scoring = evaluation.chat, evaluation.policy, evaluation.scoring
    pair_tokens = SEQUENCE_TOKENS["pair_sequence"]

    def adapter(recipe):
        """fp32 weights (trainable_in_fp32_under_fp16), AdamW's two fp32 states, and under gradient
        accumulation their fp32 gradients: the Trainer zeroes them only after the optimizer step, so
        they are alive through every later micro-batch (without accumulation backward creates them
        as it frees the activations, after the peak)"""
        return 4 + 8 + (4 if recipe.training.get("gradient_accumulation_steps", 1) > 1 else 0)

    phases = []

    # lesson 07: QLoRA SFT, then the same with loss on all tokens, then merge and compare
    t = sft.training
    rows, length = t["per_device_train_batch_size"], t["max_length"]
    sft_lora = lora_count(sft, config)
    sft_train = dict(trainable=sft_lora, bytes_per_trainable=adapter(sft),
                     seconds=60 * rebuild_minutes("sft"),
                     **training_working("sft", config, rows, length, nf4=True,
                                        checkpointing=t["activation_checkpointing"],
                                        logits=fused_head(config, rows * length, fp32_head=True)))
    chat_eval = (forward_seconds(chat["eval_examples"] * chat["max_length"])
                 + generation_seconds(chat["eval_examples"], chat["batch_size"],
                                      chat["max_new_tokens"], chat["max_length"]))
    sft_model = nf4 + sft_lora * 4
    phases.append(Phase("07", "QLoRA SFT, replies only", (("NF4 TinyLlama", nf4),), **sft_train))
    phases.append(Phase("07", "QLoRA SFT, all tokens (the first model kept)",
                        (("NF4 SFT model", sft_model), ("NF4 TinyLlama", nf4)), **sft_train))
    phases.append(Phase("07", "evaluate before/after (4 times), merge two ways and compare",
                        (("NF4 SFT models", 2 * sft_model), ("fp16 reloaded", fp16),
                         ("fp16 merged", fp16), ("fp16 merged into the dequantized base", fp16)),
                        working=sequence_logits(config, chat["batch_size"], chat["max_length"], False),
                        seconds=4 * chat_eval))

    # lesson 08: a reward model (16-bit weights, LoRA and score head in fp32)
    t = reward.training
    pairs = t["per_device_train_batch_size"]
    reward_tokens = t["max_steps"] * pairs * t["gradient_accumulation_steps"] * 2 * pair_tokens
    phases.append(Phase(
        "08", "reward model training", (("fp16 reward model", rm),),
        trainable=lora_count(reward, config) + config.hidden_size, bytes_per_trainable=adapter(reward),
        seconds=training_seconds(reward_tokens, t["activation_checkpointing"])
        + 2 * forward_seconds(HELD_OUT_PAIRS * 2 * pair_tokens),
        **training_working("reward", config, 2 * pairs, min(pair_tokens, t["max_length"]), nf4=False,
                           head="reward", checkpointing=t["activation_checkpointing"])))

    # lesson 09: the course PPO (fp16 policy with LoRA; reference = adapter off), best-of-n, GRPO
    t = ppo_recipe.training
    sequence = t["max_prompt_length"] + t["max_new_tokens"]
    policy_eval = generation_seconds(policy["max_prompts"], policy["batch_size"],
                                     policy["max_new_tokens"], policy["max_prompt_length"]) \
        + 3 * forward_seconds(policy["max_prompts"] * (policy["max_prompt_length"]
                                                       + policy["max_new_tokens"]))
    minibatch = t["minibatch_size"]
    # ppo.ppo_step (zeroes gradients before each backward): all the logits in 16 bits, the reply's in
    # fp32 for the loss, with their gradients
    ppo_logits = response_logits(config, minibatch, sequence, t["max_new_tokens"], False) \
        + minibatch * t["max_new_tokens"] * config.vocab_size * 4
    phases.append(Phase("09", "PPO", (("fp16 reward model", rm), ("fp16 policy", fp16)),
                        trainable=lora_count(ppo_recipe, config) + config.hidden_size + 1,
                        bytes_per_trainable=adapter(ppo_recipe),
                        seconds=60 * rebuild_minutes("ppo") + 2 * policy_eval,
                        # the course's loop runs no autocast: peft's fp32 LoRA path upcasts
                        **training_working("ppo", config, minibatch, sequence, nf4=False,
                                           autocast=False, checkpointing=False, logits=ppo_logits)))
    phases.append(Phase("09", "PPO variants (opt-in KL sweep, ablations), first policy kept",
                        (("fp16 reward model", rm), ("fp16 PPO policy", fp16), ("fp16 variant", fp16)),
                        trainable=phases[-1].trainable, bytes_per_trainable=adapter(ppo_recipe),
                        activations=phases[-1].activations, working=phases[-1].working))
    bon = ppo_recipe.best_of_n  # best-of-n: a pool of replies from the SFT policy, scored
    pool_replies = bon["pool_size"] * bon["max_prompts"]
    reply_sequence = policy["max_prompt_length"] + policy["max_new_tokens"]
    pool_seconds = (generation_seconds(pool_replies, bon["batch_size"], policy["max_new_tokens"],
                                       policy["max_prompt_length"])
                    + forward_seconds(pool_replies * reply_sequence))
    pool_working = generation_working(config, bon["batch_size"], policy["max_prompt_length"],
                                      reply_sequence)
    phases.append(Phase("09", "best-of-n pool (the PPO policy kept)",
                        (("fp16 reward model", rm), ("fp16 PPO policy", fp16)),
                        working=pool_working, seconds=pool_seconds))
    g = grpo.training
    completions = g["per_device_train_batch_size"]
    grpo_sequence = t["max_prompt_length"] + g["max_completion_length"]
    grpo_logits = fused_head(config, completions * g["max_completion_length"], fp32_head=False)
    phases.append(Phase(
        "09", "GRPO (trl)", (("fp16 reward model", rm), ("fp16 PPO policy", fp16),
                             ("fp16 GRPO policy", fp16)),
        trainable=lora_count(grpo, config), bytes_per_trainable=adapter(grpo),
        seconds=g["max_steps"] * (
            generation_seconds(completions, completions, g["max_completion_length"],
                               t["max_prompt_length"])
            + forward_seconds(2 * completions * grpo_sequence)
            + training_seconds(completions * grpo_sequence, g.get("activation_checkpointing", False)))
        + policy_eval,
        **training_working("grpo", config, completions, grpo_sequence, nf4=False,
                           checkpointing=g.get("activation_checkpointing", False), logits=grpo_logits)))

    # lesson 10: QLoRA DPO (reference = adapter off), a beta sweep of two more runs and two IPO; each
    # run leaves the GPU once measured (models.release)
    t = dpo_recipe.training
    pairs = t["per_device_train_batch_size"]
    dpo_train_seconds = training_seconds(
        t["max_steps"] * pairs * t["gradient_accumulation_steps"] * 2 * pair_tokens,
        t["activation_checkpointing"], reference_forward=True)
    dpo_lora = lora_count(dpo_recipe, config)
    dpo_length = min(pair_tokens, t["max_length"])
    dpo_memory = dict(trainable=dpo_lora, bytes_per_trainable=adapter(dpo_recipe),
                      **training_working("dpo", config, 2 * pairs, dpo_length, nf4=True,
                                         checkpointing=t["activation_checkpointing"],
                                         logits=fused_head(config, 2 * pairs * dpo_length, fp32_head=True)))
    phases.append(Phase("10", "QLoRA DPO", (("fp16 reward model", rm), ("NF4 policy", nf4)),
                        seconds=dpo_train_seconds + 2 * policy_eval, **dpo_memory))
    held_out = dpo_recipe.held_out["max_pairs"] or HELD_OUT_PAIRS
    variants = len(dpo_recipe.variants["sweep_betas"]) + len(dpo_recipe.variants["ipo_target_scales"])
    pair_passes = 1 + 2 + variants  # the reference once, every run before and after
    phases.append(Phase(
        "10", f"held-out pairs scored ({pair_passes} passes over {held_out} pairs)",
        (("fp16 reward model", rm), ("NF4 DPO policy", nf4), ("NF4 run", nf4)),
        working=sequence_logits(config, 2 * scoring["dpo_pairs_batch_size"], t["max_length"], True),
        seconds=pair_passes * forward_seconds(held_out * 2 * pair_tokens)))
    # IPO's target: DPO's per-token gap on training pairs, the policy's and the reference's passes
    target_pairs = dpo_recipe.variants["ipo_target_pairs"] or TRAIN_PAIRS
    phases.append(Phase("10", f"beta sweep and IPO ({variants} runs, one on the GPU at a time)",
                        (("fp16 reward model", rm), ("NF4 DPO policy", nf4),
                         ("NF4 policy", nf4)),
                        seconds=variants * (dpo_train_seconds + policy_eval)
                        + 2 * forward_seconds(target_pairs * 2 * pair_tokens), **dpo_memory))
    # rollouts.sequence_kl on the NF4 DPO policy (an fp32 LM head) and on 16-bit models
    nf4_response = response_logits(config, policy["batch_size"], reply_sequence, policy["max_new_tokens"],
                                   True)
    fp16_response = response_logits(config, policy["batch_size"], reply_sequence,
                                    policy["max_new_tokens"], False)
    phases.append(Phase("10", "DPO vs PPO", (("NF4 DPO policy", nf4), ("fp16 reward model", rm),
                                             ("fp16 PPO model", fp16), ("fp16 SFT reference", fp16)),
                        working=nf4_response, seconds=policy_eval))

    # lesson 11: four models measured one at a time against the SFT reference and the judge
    benchmark = evaluation.benchmark
    mc_seconds = generation_seconds(benchmark["mc_examples"], 64, benchmark["letter_max_new_tokens"],
                                    256) + forward_seconds(benchmark["mc_examples"] * 8 * 256)
    phases.append(Phase("11", "base, SFT, PPO and DPO measured in turn",
                        (("fp16 model under test", fp16), ("fp16 reward model", rm),
                         ("fp16 SFT reference", fp16)),
                        working=fp16_response,
                        seconds=4 * (mc_seconds + policy_eval
                                     + forward_seconds(60 * chat["max_length"]))))
    phases.append(Phase("11", "best-of-n pool from the SFT reference",
                        (("fp16 SFT reference", fp16), ("fp16 reward model", rm)),
                        working=pool_working, seconds=pool_seconds))
    return phases


def generation_working(config, rows, prompt_length, sequence) -> float:
    """``generate()``'s key/value cache for ``rows`` prompts, with the larger of its prefill's
    working set (the last position's logits only) and the reward model's forward over the whole
    rows (no gradients: one layer's tensors at a time)."""
    kv = memory.linear_shapes(config)["k_proj"][1]
    cache = config.num_hidden_layers * 2 * rows * prompt_length * kv * 2
    _, fixed, prefill = layer_bytes("ppo", config, nf4=False, grad=False)
    _, reward_fixed, scoring = layer_bytes("reward", config, nf4=False, head="reward", grad=False)
    return cache + max(fixed + rows * prompt_length * prefill,
                       reward_fixed + rows * sequence * scoring)


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


# --- the phases traced at full scale (course_utils.course.gpu_trace) -----------------------------

def _meta_trainable(config, recipe, *, nf4: bool, head: str = "causal", fused: bool = False):
    """The model a phase trains, on the meta device, prepared as the lesson prepares it: NF4 weights
    through ``prepare_model_for_kbit_training`` (norms, embeddings and LM head to fp32), or 16-bit
    weights; the recipe's LoRA adapter (``modules_to_save`` too) with every trainable weight in
    fp32, as the fp16 gradient scaler needs (``models.trainable_in_fp32``). ``fused``: with trl's
    fused LM head (``add_fused_lm_head``), as trl 1.16's SFT, DPO and GRPO trainers add it: their
    losses never hold the batch's logits, only tiles of them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl.trainer.utils import add_fused_lm_head

    checkpointing = recipe.training.get("activation_checkpointing", False)
    model = gpu_trace.meta_model(config, head, nf4=nf4)
    if fused:
        add_fused_lm_head(model)
    if nf4:
        with warnings.catch_warnings():  # peft 0.21 still calls transformers' old checkpointing names
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:  # as the trainers set it (the recipes' activation_checkpointing_kwargs)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    task = "CAUSAL_LM" if head == "causal" else "SEQ_CLS"
    with warnings.catch_warnings():  # as above: peft reads the old name of the flag
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, LoraConfig(**recipe.lora, task_type=task))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = torch.empty_like(parameter.data, dtype=torch.float32)
    return model


def _meta_frozen(config, kind: str):
    """A model a phase keeps on the GPU without training it: ``nf4`` (a QLoRA model as lesson 07
    or 10 leaves it: prepared for k-bit training, its adapter merged away in the count),
    ``fp16`` or ``reward``."""
    from peft import prepare_model_for_kbit_training

    if kind == "nf4":
        with warnings.catch_warnings():  # peft 0.21 still asks transformers' old checkpointing names
            warnings.simplefilter("ignore", FutureWarning)
            return prepare_model_for_kbit_training(gpu_trace.meta_model(config, nf4=True),
                                                   use_gradient_checkpointing=False)
    return gpu_trace.meta_model(config, "reward" if kind == "reward" else "causal")


def _ids(config, rows: int, length: int, device=None):
    return torch.randint(0, config.vocab_size, (rows, length), device=device)


def _initialise_optimizer(model, extra=()):
    """AdamW over the trainable weights, its states created (a step on zero gradients) so that the
    traced step holds them, as every step after the first does."""
    parameters = [p for p in model.parameters() if p.requires_grad] + list(extra)
    optimizer = torch.optim.AdamW(parameters)  # its states, not its rate, are what a trace needs
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _trace(resident_meta: list, build_step, trained=None, extra_trainable=(), device=None) -> dict:
    """Materialize the models (fake tensors, or random ones on ``device``), build the step, and
    measure its peak."""
    if device is None:
        context = gpu_trace.fake_tensors()
    elif torch.device(device).type == "cpu":  # the GPU check's code on a CPU: its kernels' memory
        context = gpu_trace.kernels_as_on_cuda()
    else:
        context = contextlib.nullcontext()
    with context:
        models = [gpu_trace.materialize(m, device=device) for m in resident_meta]
        extra = [gpu_trace.materialize(m, device=device) for m in extra_trainable]
        optimizer = None
        if trained is not None:
            models[trained].train()
            optimizer = _initialise_optimizer(models[trained], [p for m in extra for p in m.parameters()])
        step = build_step(models, extra, optimizer)
        measure = gpu_trace.peak_bytes if device is None else gpu_trace.device_peak_bytes
        result = measure(models + extra, step, optimizer)
    del models, extra, optimizer, step
    return result


def _device_of(models):
    device = next(models[0].parameters()).device
    return device, device.type


def _micro_batches(recipe) -> int:
    """Forward and backward passes a traced step runs before the optimizer's: two under gradient
    accumulation, since the Trainer zeroes gradients only after the optimizer step, so from the
    second micro-batch on the earlier gradients are alive during forward and backward; else one."""
    return 2 if recipe.training.get("gradient_accumulation_steps", 1) > 1 else 1


def _update(optimizer, micro_batches: int, loss) -> None:
    """``micro_batches`` forward and backward passes of ``loss()``, then the optimizer's step, as a
    trainer's step under gradient accumulation runs them."""
    for _ in range(micro_batches):
        loss().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _fused_lm_training(config, rows, length, recipe):
    """trl 1.16's ``SFTTrainer`` step: per-token log-probabilities through the fused LM head
    (``model(..., labels=..., fused_lm_head=True)``), the loss their negative mean."""
    def build(models, _, optimizer):
        model = models[0]
        device, device_type = _device_of(models)
        ids = _ids(config, rows, length, device)

        def loss():
            with torch.autocast(device_type, dtype=torch.float16):
                output = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                               fused_lm_head=True)
            return -output.log_probs.sum() / output.label_mask.sum()

        return lambda: _update(optimizer, _micro_batches(recipe), loss)
    return build


def _scoring(config, rows, length, kind, which=0, reward_index=None, prompt_length=None):
    """A forward that only scores, as the lessons' code runs it: ``sequence`` (every position's
    log-probability summed per row: ``dpo.pair_logprobs``, lesson 07's held-out loss),
    ``response`` (the reply's positions only: ``rollouts.response_logprobs``, for the KL of
    ``evaluate_policy``), or ``generate`` (``generate()``'s prefill of ``prompt_length`` tokens with
    its key/value cache and the last position's logits, then the reward model on the whole row)."""
    def build(models, _, __):
        model = models[which]
        device, _ = _device_of(models)
        ids = _ids(config, rows, length, device)
        mask = torch.ones_like(ids)

        @torch.no_grad()
        def step():  # as the lessons score: outside any trainer, so without autocast
            if kind == "sequence":
                dpo.sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
            elif kind == "response":
                response_logprobs(model, ids, mask, prompt_length)
            else:
                prompt = ids[:, :prompt_length]
                cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
                if reward_index is not None:
                    models[reward_index](input_ids=ids)
                del cache
        return step
    return build


def trace_phases(config=None, only: set | None = None, device=None) -> list[tuple[Phase, dict]]:
    """Every phase of ``course_phases`` traced: ``(phase, peak bytes by kind)``. ``config``
    replaces TinyLlama's; ``only`` restricts to those phase indices. Under a minute at full scale on
    a CPU. With ``device`` (``"cuda"``: ``scripts/t4_check.py``) the same steps run on real tensors
    there, and the peak is the device's."""
    config = config or _config()
    phases = course_phases(config)
    sft, reward = load_recipe("sft", "colab"), load_recipe("reward", "colab")
    ppo_recipe, grpo = load_recipe("ppo", "colab"), load_recipe("grpo", "colab")
    dpo_recipe, evaluation = load_recipe("dpo", "colab"), load_recipe("evaluation", "colab")
    pair_tokens = SEQUENCE_TOKENS["pair_sequence"]
    t = sft.training
    p = ppo_recipe.training
    sequence = p["max_prompt_length"] + p["max_new_tokens"]
    policy = evaluation.policy
    reply_sequence = policy["max_prompt_length"] + policy["max_new_tokens"]
    scoring = evaluation.scoring
    bon = ppo_recipe.best_of_n

    def sft_model():
        return _meta_trainable(config, sft, nf4=True, fused=True)

    def ppo_step(models, extra, optimizer):
        policy_model, value_head = models[-1], extra[0]
        device, _ = _device_of(models)
        ids = _ids(config, p["minibatch_size"], sequence, device)
        mask = torch.ones_like(ids)
        start = p["max_prompt_length"]
        response = torch.ones(p["minibatch_size"], sequence - start, device=device)

        def loss():  # ppo.ppo_step's minibatch update: the course loop runs no autocast
            logprobs, values = response_logprobs(policy_model, ids, mask, start, value_head)
            policy_loss, _ = ppo.ppo_policy_loss(logprobs, logprobs.detach(), response, p["clip_eps"],
                                                 response)
            value_loss = ppo.ppo_value_loss(values, values.detach(), response, p["value_clip_eps"],
                                            response)
            return policy_loss + p["value_coef"] * value_loss

        return lambda: _update(optimizer, 1, loss)

    def dpo_step(models, _, optimizer):
        policy_model = models[-1]
        device, device_type = _device_of(models)
        rows = 2 * dpo_recipe.training["per_device_train_batch_size"]
        ids = _ids(config, rows, min(pair_tokens, dpo_recipe.training["max_length"]), device)

        def summed(model):
            output = model(input_ids=ids, labels=ids, fused_lm_head=True)
            return output.log_probs.sum(dim=1)

        def loss():  # trl's DPO step: the policy with gradients, then the reference (adapter off)
            with torch.autocast(device_type, dtype=torch.float16):  # without, the policy's graph alive
                logps = summed(policy_model)
                with torch.no_grad(), policy_model.disable_adapter():
                    reference = summed(policy_model)
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = reference.chunk(2)
            return dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)[0].mean()

        return lambda: _update(optimizer, _micro_batches(dpo_recipe), loss)

    def reward_step(models, _, optimizer):
        model = models[0]
        device, kind = _device_of(models)
        rows = 2 * reward.training["per_device_train_batch_size"]
        ids = _ids(config, rows, min(pair_tokens, reward.training["max_length"]), device)

        def loss():
            with torch.autocast(kind, dtype=torch.float16):
                scores = model(input_ids=ids).logits.squeeze(-1)
            chosen, rejected = scores.float().chunk(2)
            return (-torch.nn.functional.logsigmoid(chosen - rejected)).mean()

        return lambda: _update(optimizer, _micro_batches(reward), loss)

    def grpo_step(models, _, optimizer):
        policy_model = models[-1]
        device, device_type = _device_of(models)
        g = grpo.training
        ids = _ids(config, g["per_device_train_batch_size"],
                   p["max_prompt_length"] + g["max_completion_length"], device)
        labels = ids.clone()
        labels[:, :p["max_prompt_length"]] = -100  # the prompt is not scored

        def loss():  # trl's GRPO step: the reference's log-probabilities (adapter off) when the
            # replies are scored, then the policy's through the fused head, with a per-token KL
            with torch.autocast(device_type, dtype=torch.float16):
                with torch.no_grad(), policy_model.disable_adapter():
                    reference = policy_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
                logps = policy_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
            kl = torch.exp(reference - logps) - (reference - logps) - 1
            return (-(logps * 1.0) + g["beta"] * kl).mean()

        return lambda: _update(optimizer, _micro_batches(grpo), loss)

    chat = evaluation.chat
    def trace(*args, **kwargs):
        return _trace(*args, device=device, **kwargs)

    tracers = [
        lambda: trace([sft_model()], _fused_lm_training(config, t["per_device_train_batch_size"],
                                                         t["max_length"], sft), trained=0),
        lambda: trace([sft_model(), _meta_trainable(config, sft, nf4=True)],
                      _fused_lm_training(config, t["per_device_train_batch_size"], t["max_length"], sft),
                      trained=0),
        lambda: trace([_meta_frozen(config, "nf4"), _meta_frozen(config, "nf4"),
                        *(_meta_frozen(config, "fp16") for _ in range(3))],
                      _scoring(config, chat["batch_size"], chat["max_length"], "sequence", which=2)),
        lambda: trace([_meta_trainable(config, reward, nf4=False, head="reward")], reward_step,
                       trained=0),
        lambda: trace([_meta_frozen(config, "reward"),
                        _meta_trainable(config, ppo_recipe, nf4=False)], ppo_step, trained=1,
                       extra_trainable=[_meta_value_head(config)]),
        lambda: trace([_meta_frozen(config, "reward"), _meta_frozen(config, "fp16"),
                        _meta_trainable(config, ppo_recipe, nf4=False)], ppo_step, trained=2,
                       extra_trainable=[_meta_value_head(config)]),
        lambda: trace([_meta_frozen(config, "fp16"), _meta_frozen(config, "reward")],
                       _scoring(config, bon["batch_size"], reply_sequence, "generate",
                                reward_index=1, prompt_length=policy["max_prompt_length"])),
        lambda: trace([_meta_frozen(config, "reward"), _meta_frozen(config, "fp16"),
                        _meta_trainable(config, grpo, nf4=False, fused=True)], grpo_step, trained=2),
        lambda: trace([_meta_frozen(config, "reward"),
                       _meta_trainable(config, dpo_recipe, nf4=True, fused=True)], dpo_step, trained=1),
        lambda: trace([_meta_frozen(config, "reward"), _meta_frozen(config, "nf4"),
                        _meta_frozen(config, "nf4")],
                       _scoring(config, 2 * scoring["dpo_pairs_batch_size"],
                                dpo_recipe.training["max_length"], "sequence", which=2)),
        lambda: trace([_meta_frozen(config, "reward"), _meta_frozen(config, "nf4"),
                        _meta_trainable(config, dpo_recipe, nf4=True, fused=True)], dpo_step, trained=2),
        lambda: trace([_meta_frozen(config, "nf4"), _meta_frozen(config, "reward"),
                        _meta_frozen(config, "fp16"), _meta_frozen(config, "fp16")],
                       _scoring(config, policy["batch_size"], reply_sequence, "response",
                                prompt_length=policy["max_prompt_length"])),
        lambda: trace([_meta_frozen(config, "fp16"), _meta_frozen(config, "reward"),
                        _meta_frozen(config, "fp16")],
                       _scoring(config, policy["batch_size"], reply_sequence, "response",
                                prompt_length=policy["max_prompt_length"])),
        lambda: trace([_meta_frozen(config, "fp16"), _meta_frozen(config, "reward")],
                       _scoring(config, bon["batch_size"], reply_sequence, "generate",
                                reward_index=1, prompt_length=policy["max_prompt_length"])),
    ]
    assert len(tracers) == len(phases), "one tracer per phase of course_phases"
    return [(phase, tracer()) for index, (phase, tracer) in enumerate(zip(phases, tracers))
            if only is None or index in only]


def _meta_value_head(config):
    with torch.device("meta"):
        return ppo.ValueHead(config.hidden_size)


TRACE_FILE = REPO_ROOT / "t4" / "trace.json"


def trace_inputs() -> dict:
    """What a trace depends on besides the code: the colab recipes' bytes and the library versions."""
    import bitsandbytes
    import peft
    import transformers

    recipes = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
               for path in sorted((RECIPES_DIR / "colab").glob("*.yaml"))}
    return {"recipes_sha256": recipes, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def write_trace(path=TRACE_FILE) -> list[dict]:
    """Trace every phase at full scale and write ``t4/trace.json``: per phase, the predicted and the
    traced peak GB (the trace plus ``CUDA_CONTEXT_GB``, which tensors do not show) and the traced
    parts; the file also records what it was traced from (``trace_inputs``)."""
    rows = []
    for phase, traced in trace_phases():
        rows.append({"lesson": phase.lesson, "phase": phase.name,
                     "predicted_gb": round(phase.peak_gb, 3),
                     "traced_gb": round(traced["total"] / GB + CUDA_CONTEXT_GB, 3),
                     "traced_parts_gb": {k: round(v / GB, 3) for k, v in traced.items() if k != "total"},
                     "predicted_minutes": round(phase.seconds / 60, 2)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**trace_inputs(), "limit_gb": LIMIT_GB, "phases": rows}, indent=1) + "\n")
    return rows


def trace_table(rows) -> str:
    lines = [f"{'lesson':6s} {'phase':58s} {'predicted GB':>12s} {'traced GB':>10s} {'difference':>10s}"]
    for row in rows:
        difference = (row["predicted_gb"] - row["traced_gb"]) / row["traced_gb"]
        lines.append(f"{row['lesson']:6s} {row['phase']:58s} {row['predicted_gb']:12.2f} "
                     f"{row['traced_gb']:10.2f} {difference:+10.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m course_utils.budget",
        description="The T4 budget of lessons 07-11 (colab recipes): peak GPU memory and minutes per "
                    "phase, predicted.")
    parser.add_argument("--trace", action="store_true",
                        help="also trace every phase at full scale under fake tensors (about a minute on "
                             "a CPU) and write t4/trace.json")
    args = parser.parse_args(argv)
    print(budget_table())
    if args.trace:
        print()
        print(trace_table(write_trace()))
        print(f"written: {TRACE_FILE.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
