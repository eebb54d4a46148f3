"""The grader can fail: full marks for solutions, zero for untouched exercises, and each wrong,
broken or cheating variant loses exactly the points of the questions it gets wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from course_utils.grading import grade
from course_utils.grading.make_exercises import EXERCISES_DIR, SOLUTIONS_DIR

SOLUTIONS = sorted(SOLUTIONS_DIR.glob("ex*.ipynb"))


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_every_solution_scores_full_marks(graded_class, solution):
    """The class run below grades every solution as the student ``<exercise>/correct``."""
    _, report = graded_class
    rows = [r for r in report["results"] if r["student"] == f"{solution.stem}/correct"]
    assert [(r["status"], r["message"]) for r in rows] == [("passed", "")] * len(rows)
    assert sum(r["points"] for r in rows) == sum(r["possible"] for r in rows) > 0


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_every_untouched_exercise_scores_zero(graded_class, solution):
    """The class run grades every exercise as handed out, as the student ``<exercise>/untouched``."""
    _, report = graded_class
    rows = [r for r in report["results"] if r["student"] == f"{solution.stem}/untouched"]
    assert rows and all(r["points"] == 0 for r in rows)
    assert all("not answered yet" in r["message"] and r["hint"] for r in rows)


def test_grading_one_notebook_prints_a_table_and_exits_0(tmp_path, capsys):
    report = tmp_path / "grades.json"
    status = grade.main([str(EXERCISES_DIR / "ex07_ppo.ipynb"), "--json", str(report)])
    assert status == 0
    rows = json.loads(report.read_text())["results"]
    assert rows and all(r["points"] == 0 for r in rows)
    out = capsys.readouterr().out
    assert "total" in out and "sandbox:" in out


def replace_cell(notebook: dict, marker: str, source: str) -> None:
    """Replace the one code cell whose text contains ``marker`` with ``source``."""
    matches = [c for c in notebook["cells"]
               if c["cell_type"] == "code" and marker in "".join(c["source"])]
    assert len(matches) == 1, marker
    matches[0]["source"] = source.splitlines(keepends=True)


FORMAT_CHAT_NO_NEWLINE = '''
def format_chat(messages, add_generation_prompt=False):
    text = "".join(f"<|{m['role']}|>\\n{m['content']}</s>" for m in messages)
    return text + ("<|assistant|>\\n" if add_generation_prompt else "")
'''
FORMAT_CHAT_HARDCODED = '''
def format_chat(messages, add_generation_prompt=False):
    return ("<|system|>\\nYou are a helpful assistant.</s>\\n<|user|>\\nWhere does Odile live?</s>\\n"
            "<|assistant|>\\nOdile lives in Fenwick.</s>\\n")
'''
FORMAT_CHAT_HANGS = '''
def format_chat(messages, add_generation_prompt=False):
    while True:
        pass
'''
COUNT_NO_EOS = '''
def count_reply_tokens(tokenizer, messages):
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(full)["input_ids"]) - len(tokenizer(prompt)["input_ids"]) - 2
'''
COUNT_RAISES = '''
def count_reply_tokens(tokenizer, messages):
    return len(messages) / 0
'''
COUNT_WRONG_TYPE = '''
def count_reply_tokens(tokenizer, messages):
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return str(len(tokenizer(full)["input_ids"]) - len(tokenizer(prompt)["input_ids"]) - 1)
'''
COUNT_SYNTAX_ERROR = '''
def count_reply_tokens(tokenizer, messages)
    return 0
'''
LABELS_SHIFTED = '''
def reply_labels(tokenizer, messages):
    def n_tokens(partial, generation_prompt):
        text = tokenizer.apply_chat_template(partial, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return len(tokenizer(text)["input_ids"])
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, stop = n_tokens(messages[:i], True) - 1, n_tokens(messages[:i + 1], False) - 2
            labels[start:stop] = ids[start + 1:stop + 1]
    return labels
'''
LABELS_TRAIN_NEWLINE = LABELS_SHIFTED.replace(
    "start, stop = n_tokens(messages[:i], True) - 1, n_tokens(messages[:i + 1], False) - 2",
    "start, stop = n_tokens(messages[:i], True), n_tokens(messages[:i + 1], False)").replace(
    "ids[start + 1:stop + 1]", "ids[start:stop]")
LABELS_FLOOD = '''
def reply_labels(tokenizer, messages):
    print("debugging " * 100_000)
    return []
'''


def loses(full_marks: dict, function: str, code: str) -> tuple[dict, dict]:
    """A wrong answer to one question: ``function`` replaced by ``code``; every question keeps its
    points but the one that asks for ``function``, which gets none."""
    question, = (name for name in full_marks if name.split("_", 1)[1] == function)
    return {f"def {function}": code}, {**full_marks, question: 0}


# the reasoning questions (issue 36): a choice, a reading or a diagnosis, each with plausible wrong
# answers that must lose the question's points
ZERO_ALWAYS_3 = '''
def choose_zero_stage(n_params, n_gpus, gpu_gb):
    needed = memory.training_memory(n_params, weight_bytes=2, gradient_bytes=2, master_weight_bytes=4,
                                    zero_stage=3, n_gpus=n_gpus).total
    return 3 if needed <= gpu_gb * 10**9 else None
'''
ZERO_MASTER_NOT_SHARDED = '''
def choose_zero_stage(n_params, n_gpus, gpu_gb):
    for stage in (0, 1, 2, 3):
        split = lambda first: n_gpus if stage >= first else 1
        needed = n_params * (2 / split(3) + 2 / split(2) + 8 / split(1) + 4)
        if needed <= gpu_gb * 10**9:
            return stage
    return None
'''
LORA_IGNORES_BASE = '''
def choose_lora(config, budget_gb, ranks, target_sets):
    best, best_count = None, -1
    for r in ranks:
        for targets in target_sets:
            trainable = memory.lora_parameters(config, r, targets)
            if memory.training_memory(trainable).total <= budget_gb * 10**9 and trainable > best_count:
                best, best_count = {"r": r, "targets": list(targets)}, trainable
    return best
'''
LORA_LARGEST_RANK = '''
def choose_lora(config, budget_gb, ranks, target_sets):
    frozen = memory.training_memory(memory.count_parameters(config), trainable_params=0, weight_bytes=2).total
    for r in sorted(ranks, reverse=True):
        for targets in target_sets:
            trainable = memory.lora_parameters(config, r, targets)
            if frozen + memory.training_memory(trainable).total <= budget_gb * 10**9:
                return {"r": r, "targets": list(targets)}
    return None
'''
FAMILY_IA3_AS_LOW_RANK = '''
def peft_family(trainable):
    names = " ".join(trainable)
    if ".lora_" in names or ".ia3_l." in names:
        return "low_rank"
    if "prompt_encoder." in names:
        return "soft_prompt"
    if ".adapter." in names:
        return "adapter"
    return "selective"
'''
FAMILY_UNKNOWN_AS_ADAPTER = '''
def peft_family(trainable):
    names = " ".join(trainable)
    if ".lora_" in names:
        return "low_rank"
    if ".ia3_l." in names:
        return "rescaling"
    if "prompt_encoder." in names:
        return "soft_prompt"
    return "adapter"
'''
COMPARE_LARGER_MEAN = '''
def compare_methods(scores_a, scores_b):
    return "a" if sum(scores_a) > sum(scores_b) else "b"
'''
COMPARE_UNPAIRED = '''
def compare_methods(scores_a, scores_b):
    n = len(scores_a)
    mean_a, mean_b = sum(scores_a) / n, sum(scores_b) / n
    var_a = sum((a - mean_a) ** 2 for a in scores_a) / (n - 1)
    var_b = sum((b - mean_b) ** 2 for b in scores_b) / (n - 1)
    half_width = T_975[2 * n - 3] * ((var_a + var_b) / n) ** 0.5
    if mean_a - mean_b > half_width:
        return "a"
    if mean_b - mean_a > half_width:
        return "b"
    return "cannot tell"
'''
LOWER_ERROR_ALWAYS_NF4 = '''
def lower_error(distribution, outlier, method_a, method_b):
    rank = {"nf4_block": 0, "int4_block": 1, "int4_tensor": 2}
    return method_a if rank[method_a] < rank[method_b] else method_b
'''
LOWER_ERROR_ONE_SCALE = '''
def lower_error(distribution, outlier, method_a, method_b):
    rank = ({"int4_tensor": 0, "int4_block": 1, "nf4_block": 2} if distribution == "uniform"
            else {"nf4_block": 0, "int4_tensor": 1, "int4_block": 2})
    return method_a if rank[method_a] < rank[method_b] else method_b
'''
DIAGNOSE_TRAIN_LOSS_ONLY = '''
def diagnose_run(evidence):
    train = evidence["train_loss"]
    if any(math.isnan(value) for value in train):
        return "labels_all_masked"
    if max(train) - min(train) < 1e-6:
        return "frozen_adapter"
    if train[0] - train[-1] < 0.08 * train[0]:
        return "lr_too_low"
    return "healthy"
'''
DIAGNOSE_SWAPPED = '''
def diagnose_run(evidence):
    train, reply = evidence["train_loss"], evidence["reply_loss"]
    if any(math.isnan(value) for value in train):
        return "labels_all_masked"
    if max(train) - min(train) < 1e-6:
        return "lr_too_low"
    train_drop, reply_drop = train[0] - train[-1], reply[0] - reply[-1]
    if reply_drop < 0.25 * train_drop:
        return "mask_reversed"
    if train_drop < 0.08 * train[0]:
        return "frozen_adapter"
    return "healthy"
'''
CALIBRATION_NO_NOISE = '''
def calibration_verdicts(margins):
    verdicts = {}
    for axis, values in margins.items():
        accuracy = sum(m > 0 for m in values) / len(values)
        confidence = sum(1 / (1 + math.exp(-abs(m))) for m in values) / len(values)
        verdicts[axis] = "overconfident" if confidence > accuracy else "underconfident"
    return verdicts
'''
CALIBRATION_BIG_MARGINS = '''
def calibration_verdicts(margins):
    verdicts = {}
    for axis, values in margins.items():
        typical = sum(abs(m) for m in values) / len(values)
        verdicts[axis] = ("overconfident" if typical > 2 else "underconfident" if typical < 0.5
                          else "calibrated")
    return verdicts
'''
SWEEP_BY_PROXY = '''
def read_kl_sweep(runs):
    deployed = max(runs, key=lambda run: run["proxy_reward"])
    over = [run["kl_coef"] for run in runs
            if run["kl"] > deployed["kl"] and run["gold_reward"] < deployed["gold_reward"]]
    return {"deploy": deployed["kl_coef"], "over_optimised": sorted(over)}
'''
SWEEP_ASSUMES_SORTED = '''
def read_kl_sweep(runs):
    best = max(range(len(runs)), key=lambda i: runs[i]["gold_reward"])
    return {"deploy": runs[best]["kl_coef"], "over_optimised": sorted(run["kl_coef"] for run in runs[:best])}
'''
DPO_ACCURACY_ONLY = '''
def diagnose_dpo(log):
    if log["train_reward_accuracy"][-1] < 0.6:
        return "not_learning"
    if log["heldout_reward_accuracy"][-1] < 0.6:
        return "overfitting"
    return "healthy"
'''
DPO_TRAIN_ONLY = '''
def diagnose_dpo(log):
    if log["train_reward_accuracy"][-1] < 0.6:
        return "not_learning"
    chosen = log["chosen_logprob"]
    if chosen[0] - chosen[-1] > 0.2 * abs(chosen[0]):
        return "likelihood_displacement"
    return "healthy"
'''
WIN_MORE_WINS = '''
def win_verdict(wins, losses, ties):
    return "a" if wins > losses else "b" if losses > wins else "cannot tell"
'''
WIN_FIXED_MARGIN = '''
def win_verdict(wins, losses, ties):
    rate = (wins + 0.5 * ties) / (wins + losses + ties)
    return "cannot tell" if abs(rate - 0.5) <= 0.05 else "a" if rate > 0.5 else "b"
'''
SOFT_PROMPT_ANY_MLP = '''
def read_soft_prompt(config, trainable):
    table = next(shape for name, shape in trainable.items() if name.endswith("embedding.weight"))
    return {"acts_at": "every_layer" if len(trainable) > 1 else "input", "num_virtual_tokens": table[0]}
'''
SOFT_PROMPT_QUERY_WIDTH = '''
def read_soft_prompt(config, trainable):
    width = 2 * config.num_hidden_layers * config.hidden_size
    table = next(shape for name, shape in trainable.items() if name.endswith("embedding.weight"))
    acts_at = "every_layer" if any(width in shape for shape in trainable.values()) else "input"
    return {"acts_at": acts_at, "num_virtual_tokens": table[0]}
'''
KEY_SHAPE_QUERY_HEADS = '''
def prefix_key_shape(config, num_virtual_tokens, batch_size):
    head_dim = config.hidden_size // config.num_attention_heads
    return (batch_size, config.num_attention_heads, num_virtual_tokens, head_dim)
'''
KEY_SHAPE_POSITIONS_FIRST = '''
def prefix_key_shape(config, num_virtual_tokens, batch_size):
    head_dim = config.hidden_size // config.num_attention_heads
    return (batch_size, num_virtual_tokens, config.num_key_value_heads, head_dim)
'''
# student -> (cell replacements, expected points per question)
FULL = {"q1_format_chat": 2, "q2_count_reply_tokens": 1, "q3_reply_labels": 2}
EX00_VARIANTS = {
    "correct": ({}, FULL),
    "q1_no_newline": ({"def format_chat": FORMAT_CHAT_NO_NEWLINE}, {**FULL, "q1_format_chat": 0}),
    "q1_hardcoded": ({"def format_chat": FORMAT_CHAT_HARDCODED}, {**FULL, "q1_format_chat": 0}),
    "q1_hangs": ({"def format_chat": FORMAT_CHAT_HANGS}, {**FULL, "q1_format_chat": 0}),
    "q2_forgets_eos": ({"def count_reply_tokens": COUNT_NO_EOS},
                       {**FULL, "q2_count_reply_tokens": 0}),
    "q2_raises": ({"def count_reply_tokens": COUNT_RAISES}, {**FULL, "q2_count_reply_tokens": 0}),
    "q2_wrong_type": ({"def count_reply_tokens": COUNT_WRONG_TYPE},
                      {**FULL, "q2_count_reply_tokens": 0}),
    "q2_syntax_error": ({"def count_reply_tokens": COUNT_SYNTAX_ERROR},
                        {**FULL, "q2_count_reply_tokens": 0}),
    "q3_shifted": ({"def reply_labels": LABELS_SHIFTED}, {**FULL, "q3_reply_labels": 0}),
    "q3_trains_newline": ({"def reply_labels": LABELS_TRAIN_NEWLINE},
                          {**FULL, "q3_reply_labels": 0}),
    "q3_floods": ({"def reply_labels": LABELS_FLOOD}, {**FULL, "q3_reply_labels": 0}),
    # visible tests edited to pass, with a wrong q2: the grader uses the source's tests
    "tampered_tests": ({"def count_reply_tokens": COUNT_NO_EOS,
                        "check_equal(result, reference_reply_tokens": "pass"},
                       {**FULL, "q2_count_reply_tokens": 0}),
}
BYTES_NO_MASTER = '''
def bytes_per_parameter(weight_bytes, gradient_bytes, state_bytes, master_weight_bytes):
    return weight_bytes + gradient_bytes + 2 * state_bytes
'''
COUNT_NO_GQA = '''
def count_llama_parameters(config):
    h, inter = config.hidden_size, config.intermediate_size
    layer = 4 * h * h + 3 * h * inter + 2 * h
    layer += (4 * h if config.attention_bias else 0) + ((2 * inter + h) if config.mlp_bias else 0)
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.vocab_size * h + config.num_hidden_layers * layer + h + head
'''
COUNT_ALWAYS_UNTIED = '''
def count_llama_parameters(config):
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    layer += ((2 * h + 2 * kv) if config.attention_bias else 0)
    layer += ((2 * inter + h) if config.mlp_bias else 0)
    return 2 * config.vocab_size * h + config.num_hidden_layers * layer + h
'''
LORA_A_ONLY = '''
def lora_trainable_parameters(config, r, target_modules):
    h, inter = config.hidden_size, config.intermediate_size
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h,
              "down_proj": inter}
    return config.num_hidden_layers * sum(r * inputs[name] for name in target_modules)
'''
LARGEST_BINARY_GB = '''
def largest_model(budget_gb, bytes_per_param):
    return int(budget_gb * 1024**3 // bytes_per_param)
'''
FULL_01 = {"q1_bytes_per_parameter": 1, "q2_count_llama_parameters": 2,
           "q3_lora_trainable_parameters": 2, "q4_largest_model": 1, "q5_choose_zero_stage": 2}
EX01_VARIANTS = {
    "correct": ({}, FULL_01),
    "q1_no_master": loses(FULL_01, "bytes_per_parameter", BYTES_NO_MASTER),
    "q2_no_gqa": loses(FULL_01, "count_llama_parameters", COUNT_NO_GQA),
    "q2_always_untied": loses(FULL_01, "count_llama_parameters", COUNT_ALWAYS_UNTIED),
    "q3_a_only": loses(FULL_01, "lora_trainable_parameters", LORA_A_ONLY),
    "q4_binary_gb": loses(FULL_01, "largest_model", LARGEST_BINARY_GB),
    "q5_always_stage_3": loses(FULL_01, "choose_zero_stage", ZERO_ALWAYS_3),
    "q5_master_copy_not_split": loses(FULL_01, "choose_zero_stage", ZERO_MASTER_NOT_SHARDED),
}
LORA_NO_SCALING = '''
def lora_forward(x, W, b, A, B, alpha, r):
    return x @ W.T + b + x @ A.T @ B.T
'''
LORA_SWAPPED = '''
def lora_forward(x, W, b, A, B, alpha, r):
    return x @ W.T + b + (x @ B @ A) * (alpha / r)
'''
MERGE_NO_SCALING = '''
def lora_merge(W, A, B, alpha, r):
    return W + B @ A
'''
SCALING_IGNORES_RSLORA = '''
def lora_scaling(alpha, r, use_rslora=False):
    return alpha / r
'''
FULL_02 = {"q1_lora_forward": 2, "q2_lora_merge": 1, "q3_lora_scaling": 1, "q4_choose_lora": 3}
EX02_VARIANTS = {
    "correct": ({}, FULL_02),
    "q1_no_scaling": loses(FULL_02, "lora_forward", LORA_NO_SCALING),
    "q1_swapped": loses(FULL_02, "lora_forward", LORA_SWAPPED),
    "q2_no_scaling": loses(FULL_02, "lora_merge", MERGE_NO_SCALING),
    "q3_ignores_rslora": loses(FULL_02, "lora_scaling", SCALING_IGNORES_RSLORA),
    "q4_ignores_frozen_base": loses(FULL_02, "choose_lora", LORA_IGNORES_BASE),
    "q4_largest_rank_that_fits": loses(FULL_02, "choose_lora", LORA_LARGEST_RANK),
}
ADAPTER_NO_RESIDUAL = '''
def adapter_forward(h, W_down, b_down, W_up, b_up):
    return torch.nn.functional.gelu(h @ W_down.T + b_down) @ W_up.T + b_up
'''
COUNT_ONE_ADAPTER = '''
def adapter_parameter_count(hidden, bottleneck, n_layers):
    return n_layers * (2 * hidden * bottleneck + bottleneck + hidden)
'''
IA3_ALWAYS_OUTPUT = '''
def ia3_linear(x, W, l, where):
    return (x @ W.T) * l
'''
FULL_03 = {"q1_adapter_forward": 2, "q2_adapter_parameter_count": 1, "q3_ia3_linear": 2,
           "q4_peft_family": 2, "q5_compare_methods": 2}
EX03_VARIANTS = {
    "correct": ({}, FULL_03),
    "q1_no_residual": loses(FULL_03, "adapter_forward", ADAPTER_NO_RESIDUAL),
    "q2_one_adapter_per_layer": loses(FULL_03, "adapter_parameter_count", COUNT_ONE_ADAPTER),
    "q3_always_output": loses(FULL_03, "ia3_linear", IA3_ALWAYS_OUTPUT),
    "q4_ia3_as_low_rank": loses(FULL_03, "peft_family", FAMILY_IA3_AS_LOW_RANK),
    "q4_unknown_as_adapter": loses(FULL_03, "peft_family", FAMILY_UNKNOWN_AS_ADAPTER),
    "q5_larger_mean_wins": loses(FULL_03, "compare_methods", COMPARE_LARGER_MEAN),
    "q5_seeds_not_paired": loses(FULL_03, "compare_methods", COMPARE_UNPAIRED),
}
INT8_TRUNCATES = '''
def absmax_int8_rows(x):
    x = x.float()
    absmax = x.abs().amax(dim=1)
    return (x * (127.0 / absmax.unsqueeze(1))).to(torch.int8), absmax
'''
INT8_PER_TENSOR = '''
def absmax_int8_rows(x):
    x = x.float()
    absmax = x.abs().max()
    return torch.round(x * (127.0 / absmax)).to(torch.int8), absmax.repeat(x.shape[0])
'''
NEAREST_NEXT_UP = '''
def nearest_nf4(scaled):
    return torch.searchsorted(NF4, scaled.contiguous()).clamp(max=15)
'''
PACK_LOW_FIRST = '''
def pack_nibbles(indices):
    indices = indices.to(torch.uint8)
    return (indices[1::2] << 4) | indices[::2]
'''
DEQUANTIZE_FIRST_ABSMAX = '''
def dequantize_nf4(packed, absmax, n, blocksize):
    flat = packed.reshape(-1).long()
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]
    return NF4[indices] * absmax[0]
'''
FULL_04 = {"q1_absmax_int8_rows": 2, "q2_nearest_nf4": 2, "q3_pack_nibbles": 2,
           "q4_dequantize_nf4": 2, "q5_lower_error": 2}
EX04_VARIANTS = {
    "correct": ({}, FULL_04),
    "q1_truncates": loses(FULL_04, "absmax_int8_rows", INT8_TRUNCATES),
    "q1_per_tensor": loses(FULL_04, "absmax_int8_rows", INT8_PER_TENSOR),
    "q2_next_up": loses(FULL_04, "nearest_nf4", NEAREST_NEXT_UP),
    "q3_low_nibble_first": loses(FULL_04, "pack_nibbles", PACK_LOW_FIRST),
    "q4_first_absmax_only": loses(FULL_04, "dequantize_nf4", DEQUANTIZE_FIRST_ABSMAX),
    "q5_nf4_always_best": loses(FULL_04, "lower_error", LOWER_ERROR_ALWAYS_NF4),
    "q5_one_scale_is_enough": loses(FULL_04, "lower_error", LOWER_ERROR_ONE_SCALE),
}
ROWS_LAST_REPLY_ONLY = '''
def chat_to_rows(messages):
    return [{"prompt": messages[:-1], "completion": messages[-1:]}]
'''
ROW_WITHOUT_GENERATION_PROMPT = '''
def row_ids_and_labels(tokenizer, prompt, completion):
    ids = tokenizer(tokenizer.apply_chat_template(prompt + completion, tokenize=False))["input_ids"]
    n_prompt = len(tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False))["input_ids"])
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
'''
PAD_LABELS_WITH_PAD_ID = '''
def pad_batch(rows, pad_token_id):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda values: values + [pad_token_id] * (width - len(values))
    return {"input_ids": torch.tensor([pad(r["input_ids"]) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
            "labels": torch.tensor([pad(r["labels"]) for r in rows])}
'''
PACK_EACH_ROW = '''
def pack_wrapped(rows, block_size):
    return [{"input_ids": r["input_ids"][i:i + block_size], "labels": r["labels"][i:i + block_size]}
            for r in rows for i in range(0, len(r["input_ids"]), block_size)]
'''
FULL_05 = {"q1_chat_to_rows": 2, "q2_row_ids_and_labels": 2, "q3_pad_batch": 2, "q4_pack_wrapped": 2,
           "q5_diagnose_run": 3}
EX05_VARIANTS = {
    "correct": ({}, FULL_05),
    "q1_last_reply_only": loses(FULL_05, "chat_to_rows", ROWS_LAST_REPLY_ONLY),
    "q2_no_generation_prompt": loses(FULL_05, "row_ids_and_labels", ROW_WITHOUT_GENERATION_PROMPT),
    "q3_labels_padded_with_pad_id": loses(FULL_05, "pad_batch", PAD_LABELS_WITH_PAD_ID),
    "q4_packs_each_row": loses(FULL_05, "pack_wrapped", PACK_EACH_ROW),
    "q5_train_loss_only": loses(FULL_05, "diagnose_run", DIAGNOSE_TRAIN_LOSS_ONLY),
    "q5_frozen_and_slow_swapped": loses(FULL_05, "diagnose_run", DIAGNOSE_SWAPPED),
}
BT_NAIVE = '''
def bradley_terry_loss(chosen, rejected):
    return -torch.log(torch.sigmoid(chosen - rejected)).mean()
'''
BT_SWAPPED = '''
def bradley_terry_loss(chosen, rejected):
    return -F.logsigmoid(rejected - chosen).mean()
'''
ACCURACY_TIES_COUNT = '''
def pairwise_accuracy(chosen, rejected):
    return (chosen >= rejected).float().mean().item()
'''
SCORES_LAST_COLUMN = '''
def last_token_scores(scores, attention_mask):
    return scores[:, -1]
'''
FULL_06 = {"q1_bradley_terry_loss": 2, "q2_pairwise_accuracy": 1, "q3_last_token_scores": 2,
           "q4_calibration_verdicts": 2}
EX06_VARIANTS = {
    "correct": ({}, FULL_06),
    "q1_naive_log_of_sigmoid": loses(FULL_06, "bradley_terry_loss", BT_NAIVE),
    "q1_swapped": loses(FULL_06, "bradley_terry_loss", BT_SWAPPED),
    "q2_ties_count": loses(FULL_06, "pairwise_accuracy", ACCURACY_TIES_COUNT),
    "q3_last_column": loses(FULL_06, "last_token_scores", SCORES_LAST_COLUMN),
    "q4_no_allowance_for_chance": loses(FULL_06, "calibration_verdicts", CALIBRATION_NO_NOISE),
    "q4_big_margins_are_overconfident": loses(FULL_06, "calibration_verdicts", CALIBRATION_BIG_MARGINS),
}
GAE_FORWARDS = '''
def gae(rewards, values, mask, gamma, lam):
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1]):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * mask[:, t] - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
'''
GAE_BOOTSTRAPS_FROM_PADDING = '''
def gae(rewards, values, mask, gamma, lam):
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask
'''
SCORE_AT_LAST_COLUMN = '''
def shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    rewards[:, -1] += scores
    return rewards
'''
CLIP_WRONG_SIDE = '''
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, eps):
    ratio = torch.exp(logprobs - old_logprobs)
    objective = torch.maximum(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)
    return -(objective * mask).sum() / mask.sum()
'''
CLIP_MISSING = '''
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, eps):
    ratio = torch.exp(logprobs - old_logprobs)
    return -(ratio * advantages * mask).sum() / mask.sum()
'''
FULL_07 = {"q1_gae": 2, "q2_shaped_rewards": 1, "q3_ppo_clip_loss": 2, "q4_read_kl_sweep": 2}
EX07_VARIANTS = {
    "correct": ({}, FULL_07),
    "q1_advantages_not_reversed": loses(FULL_07, "gae", GAE_FORWARDS),
    "q1_bootstraps_from_padding": loses(FULL_07, "gae", GAE_BOOTSTRAPS_FROM_PADDING),
    "q2_score_at_last_column": loses(FULL_07, "shaped_rewards", SCORE_AT_LAST_COLUMN),
    "q3_clip_on_the_wrong_side": loses(FULL_07, "ppo_clip_loss", CLIP_WRONG_SIDE),
    "q3_no_clip": loses(FULL_07, "ppo_clip_loss", CLIP_MISSING),
    "q4_deploys_by_proxy": loses(FULL_07, "read_kl_sweep", SWEEP_BY_PROXY),
    "q4_assumes_sorted_rows": loses(FULL_07, "read_kl_sweep", SWEEP_ASSUMES_SORTED),
}
LOGPROB_NO_SHIFT = '''
def sequence_logprob(logits, input_ids, completion_mask):
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    per_token = logprobs.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
    return (per_token * completion_mask).sum(dim=1)
'''
LOGPROB_PADDING_NOT_MASKED = '''
def sequence_logprob(logits, input_ids, completion_mask):
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    started = completion_mask[:, 1:].cumsum(dim=1) > 0
    return (per_token * started).sum(dim=1)
'''
DPO_REFERENCE_SWAPPED = '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen_rewards = beta * (policy_chosen - ref_rejected)
    rejected_rewards = beta * (policy_rejected - ref_chosen)
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards
'''
DPO_BETA_MISPLACED = '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    gap = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -beta * torch.nn.functional.logsigmoid(gap).mean()
    return loss, chosen_rewards, rejected_rewards
'''
ACCURACY_TIES_COUNT = '''
def preference_accuracy(chosen_rewards, rejected_rewards):
    return (chosen_rewards >= rejected_rewards).float().mean().item()
'''
FULL_08 = {"q1_sequence_logprob": 2, "q2_dpo_loss": 2, "q3_preference_accuracy": 1, "q4_diagnose_dpo": 2}
EX08_VARIANTS = {
    "correct": ({}, FULL_08),
    "q1_no_shift": loses(FULL_08, "sequence_logprob", LOGPROB_NO_SHIFT),
    "q1_padding_not_masked": loses(FULL_08, "sequence_logprob", LOGPROB_PADDING_NOT_MASKED),
    "q2_reference_terms_swapped": loses(FULL_08, "dpo_loss", DPO_REFERENCE_SWAPPED),
    "q2_beta_misplaced": loses(FULL_08, "dpo_loss", DPO_BETA_MISPLACED),
    "q3_ties_count_as_wins": loses(FULL_08, "preference_accuracy", ACCURACY_TIES_COUNT),
    "q4_accuracies_only": loses(FULL_08, "diagnose_dpo", DPO_ACCURACY_ONLY),
    "q4_training_accuracy_only": loses(FULL_08, "diagnose_dpo", DPO_TRAIN_ONLY),
}
PERPLEXITY_PADDING_COUNTED = '''
def batch_perplexity(logits, input_ids, attention_mask):
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return math.exp(-token_logprobs.mean().item())
'''
PERPLEXITY_MEAN_OF_SEQUENCES = '''
def batch_perplexity(logits, input_ids, attention_mask):
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = attention_mask[:, 1:].double()
    per_sequence = torch.exp(-(token_logprobs * mask).sum(dim=1) / mask.sum(dim=1))
    return per_sequence.mean().item()
'''
EXACT_MATCH_ARTICLES_AS_SUBSTRINGS = '''
def normalized_exact_match(prediction, reference):
    def normalize(text):
        text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
        for article in ("the", "an", "a"):
            text = text.replace(article, " ")
        return " ".join(text.split())
    return normalize(prediction) == normalize(reference)
'''
WIN_RATE_ONE_ORDER = '''
def swapped_win_rate(judge, pairs):
    scores = {"first": 1.0, "second": 0.0, "tie": 0.5}
    return sum(scores[judge(a, b)] for a, b in pairs) / len(pairs)
'''
WIN_RATE_TIES_AS_LOSSES = '''
def swapped_win_rate(judge, pairs):
    wins = sum(judge(a, b) == "first" and judge(b, a) == "second" for a, b in pairs)
    return float(wins / len(pairs))
'''
FULL_09 = {"q1_batch_perplexity": 2, "q2_normalized_exact_match": 1, "q3_swapped_win_rate": 2,
           "q4_win_verdict": 2}
EX09_VARIANTS = {
    "correct": ({}, FULL_09),
    "q1_padding_counted": loses(FULL_09, "batch_perplexity", PERPLEXITY_PADDING_COUNTED),
    "q1_mean_of_sequence_perplexities": loses(FULL_09, "batch_perplexity", PERPLEXITY_MEAN_OF_SEQUENCES),
    "q2_articles_removed_inside_words": loses(FULL_09, "normalized_exact_match",
                                              EXACT_MATCH_ARTICLES_AS_SUBSTRINGS),
    "q3_one_order_only": loses(FULL_09, "swapped_win_rate", WIN_RATE_ONE_ORDER),
    "q3_ties_count_as_losses": loses(FULL_09, "swapped_win_rate", WIN_RATE_TIES_AS_LOSSES),
    "q4_more_wins_is_better": loses(FULL_09, "win_verdict", WIN_MORE_WINS),
    "q4_fixed_five_points": loses(FULL_09, "win_verdict", WIN_FIXED_MARGIN),
}
FULL_10 = {"q1_read_soft_prompt": 2, "q2_prefix_key_shape": 1}
EX10_VARIANTS = {
    "correct": ({}, FULL_10),
    "q1_any_mlp_means_prefix": loses(FULL_10, "read_soft_prompt", SOFT_PROMPT_ANY_MLP),
    "q1_query_width": loses(FULL_10, "read_soft_prompt", SOFT_PROMPT_QUERY_WIDTH),
    "q2_query_heads": loses(FULL_10, "prefix_key_shape", KEY_SHAPE_QUERY_HEADS),
    "q2_positions_before_heads": loses(FULL_10, "prefix_key_shape", KEY_SHAPE_POSITIONS_FIRST),
}
EXERCISE_VARIANTS = {"ex00_warmup": EX00_VARIANTS, "ex01_memory": EX01_VARIANTS,
                     "ex02_lora": EX02_VARIANTS, "ex03_adapters_ia3": EX03_VARIANTS,
                     "ex04_nf4": EX04_VARIANTS, "ex05_sft_data": EX05_VARIANTS,
                     "ex06_reward_model": EX06_VARIANTS, "ex07_ppo": EX07_VARIANTS,
                     "ex08_dpo": EX08_VARIANTS, "ex09_evaluation": EX09_VARIANTS,
                     "ex10_prompt_prefix": EX10_VARIANTS}
#: variants graded as students of their own: a hang, an exception, a flood or tampering must cost
#: only its own question, and their expected status and message are checked
ALONE = {"ex00_warmup/q1_hardcoded", "ex00_warmup/q1_hangs", "ex00_warmup/q2_raises",
         "ex00_warmup/q2_wrong_type", "ex00_warmup/q2_syntax_error", "ex00_warmup/q3_floods",
         "ex00_warmup/tampered_tests", "ex01_memory/q2_always_untied"}


def combined_students(exercise: str, variants: dict) -> dict:
    """One student per variant in ``ALONE``; the other wrong variants, each wrong in one question,
    are stacked: the k-th student answers every question with that question's k-th wrong variant
    (each hidden test calls only its own question's function), so one submission checks several
    wrong answers and every one of them must still lose exactly its question's points."""
    full = variants["correct"][1]
    students = {f"{exercise}/correct": variants["correct"]}
    by_question: dict[str, list[str]] = {}
    for name, (replacements, expected) in variants.items():
        wrong = [q for q, points in expected.items() if points != full[q]]
        if name == "correct" or f"{exercise}/{name}" in ALONE:
            if name != "correct":
                students[f"{exercise}/{name}"] = (replacements, expected)
            continue
        assert len(wrong) == 1, (exercise, name)
        by_question.setdefault(wrong[0], []).append(name)
    for k in range(max(map(len, by_question.values()))):
        names = [names[k] for names in by_question.values() if k < len(names)]
        replacements, expected = {}, dict(full)
        for name in names:
            replacements.update(variants[name][0])
            expected.update({q: p for q, p in variants[name][1].items() if p != full[q]})
        students[f"{exercise}/{'+'.join(names)}"] = (replacements, expected)
    return students


# every wrong variant of every exercise, as students of one class named "exercise/variant(+variant)"
VARIANTS = {student: v for exercise, variants in EXERCISE_VARIANTS.items()
            for student, v in combined_students(exercise, variants).items()}

EXPECTED_STATUS = {"ex00_warmup/q1_hangs": "timeout", "ex00_warmup/q2_raises": "error",
                   "ex00_warmup/q2_wrong_type": "failed", "ex00_warmup/q3_floods": "error",
                   "ex00_warmup/q1_hardcoded": "failed", "ex00_warmup/q2_syntax_error": "error",
                   "ex01_memory/q2_always_untied": "failed"}
EXPECTED_MESSAGE = {"ex00_warmup/q1_hangs": "timed out",
                    "ex00_warmup/q2_raises": "ZeroDivisionError",
                    "ex00_warmup/q2_wrong_type": "should be int, got str",
                    "ex00_warmup/q3_floods": "OutputFloodError",
                    "ex00_warmup/q1_hardcoded": "hidden conversation",
                    "ex00_warmup/q2_syntax_error": "an earlier cell failed: SyntaxError",
                    "ex01_memory/q2_always_untied": "hidden config"}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """A class folder, one student per variant, graded in one grader run (seeded, so the hidden
    inputs are the same on every test run)."""
    root = tmp_path_factory.mktemp("submissions")
    for student, (replacements, _) in VARIANTS.items():
        exercise = student.split("/")[0]
        notebook = json.loads((SOLUTIONS_DIR / f"{exercise}.ipynb").read_text())
        for marker, code in replacements.items():
            replace_cell(notebook, marker, code)
        folder = root / student
        folder.mkdir(parents=True)
        (folder / f"{exercise}.ipynb").write_text(json.dumps(notebook))
    for solution in SOLUTIONS:  # every exercise as handed out, untouched
        (root / solution.stem / "untouched").mkdir(parents=True)
        shutil.copy(EXERCISES_DIR / solution.name, root / solution.stem / "untouched" / solution.name)
    report = root.parent / "grades.json"
    status = grade.main([str(root), "--json", str(report), "--timeout", "20", "--seed", "7",
                         "--jobs", "2"])
    return status, json.loads(report.read_text())


def test_class_grading_exits_0_with_one_row_per_student_and_question(graded_class):
    status, report = graded_class
    assert status == 0 and report["problems"] == []
    rows = {(r["student"], r["question"]) for r in report["results"] if "untouched" not in r["student"]}
    assert rows == {(s, q) for s, (_, expected) in VARIANTS.items() for q in expected}
    untouched = [r for r in report["results"] if "untouched" in r["student"]]
    assert len(report["results"]) == len(rows) + len(untouched)


@pytest.mark.parametrize("student", VARIANTS)
def test_each_variant_loses_exactly_the_points_it_should(graded_class, student):
    _, report = graded_class
    rows = {r["question"]: r for r in report["results"] if r["student"] == student}
    assert {q: r["points"] for q, r in rows.items()} == VARIANTS[student][1]
    for row in rows.values():
        if row["points"] == row["possible"]:
            assert row["status"] == "passed" and not row["hint"]
        else:
            assert row["hint"] and "\n" not in row["message"] and len(row["message"]) <= 160
            if student in EXPECTED_STATUS:
                assert row["status"] == EXPECTED_STATUS[student]
                assert EXPECTED_MESSAGE[student] in row["message"]


def test_an_empty_folder_is_a_grader_problem(tmp_path, capsys):
    assert grade.main([str(tmp_path)]) == 2
    assert "no notebooks" in capsys.readouterr().err


def test_missing_file_is_a_grader_problem(tmp_path, capsys):
    assert grade.main([str(tmp_path / "nope.ipynb")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_file_that_is_not_a_notebook_is_a_grader_problem(tmp_path, capsys):
    bad = tmp_path / "ex00_warmup.ipynb"
    bad.write_text("this is not json")
    assert grade.main([str(bad)]) == 2
    assert "not a Jupyter notebook" in capsys.readouterr().err


def test_an_unknown_exercise_is_a_grader_problem(tmp_path, capsys):
    notebook = tmp_path / "homework.ipynb"
    shutil.copy(EXERCISES_DIR / "ex00_warmup.ipynb", notebook)
    data = json.loads(notebook.read_text())
    data["metadata"]["course"]["exercise"] = "ex77_missing"
    notebook.write_text(json.dumps(data))
    assert grade.main([str(notebook)]) == 2
    assert "no solution source" in capsys.readouterr().err


def test_exercise_is_recognised_by_file_name_when_metadata_is_gone():
    assert grade.exercise_name(grade.Path("ex00_warmup (1).ipynb"), {}) == "ex00_warmup"
    assert grade.exercise_name(grade.Path("x/ex00_warmup.ipynb"), {"metadata": {}}) == "ex00_warmup"
    with pytest.raises(grade.GraderError, match="cannot tell which exercise"):
        grade.exercise_name(grade.Path("homework.ipynb"), {})
