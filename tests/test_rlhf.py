"""Each PPO and reward-model component against a straightforward reference written here."""

from __future__ import annotations

import math
import random

import pytest
import torch

from course_utils import dpo, ppo, reward_modeling, rollouts
from course_utils.course.recipes import load_recipe


def ppo_config_with(**changes) -> ppo.PPOConfig:
    """The tiny PPO recipe with some values changed, as a ``PPOConfig``."""
    return ppo.PPOConfig.from_recipe(load_recipe("ppo", "tiny").with_changes(training=changes))


def small_lora_recipe():
    return load_recipe("ppo", "tiny").with_changes(lora={"r": 4, "lora_alpha": 8})


def random_batch(seed: int, batch: int = 5, time: int = 9):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    mask = (torch.arange(time)[None, :] < lengths[:, None]).float()
    return generator, mask


def reference_gae(rewards, values, mask, gamma, lam):
    """Loop over sequences and time steps, as the paper writes it."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("seed", range(20))
def test_gae_matches_the_loop_reference(seed):
    generator, mask = random_batch(seed)
    rewards = torch.randn(mask.shape, generator=generator)
    values = torch.randn(mask.shape, generator=generator)
    rng = random.Random(seed)
    gamma, lam = rng.choice([1.0, 0.99, 0.9]), rng.choice([1.0, 0.95, 0.5, 0.0])
    advantages, returns = ppo.gae(rewards, values, gamma, lam, mask)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_with_lambda_one_and_no_critic_is_the_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    advantages, _ = ppo.gae(rewards, torch.zeros_like(rewards), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[6.0, 5.0, 3.0]]


def reference_policy_loss(logprobs, old_logprobs, advantages, eps, mask):
    total, count, clipped_count = 0.0, 0, 0
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[b, t]:
                ratio = math.exp(logprobs[b, t].item() - old_logprobs[b, t].item())
                a = advantages[b, t].item()
                unclipped, clipped = ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a
                total += min(unclipped, clipped)
                clipped_count += clipped < unclipped
                count += 1
    return -total / count, clipped_count / count


@pytest.mark.parametrize("seed", range(20))
def test_ppo_policy_loss_matches_the_loop_reference(seed):
    generator, mask = random_batch(seed)
    old = torch.randn(mask.shape, generator=generator) - 2
    new = old + 0.4 * torch.randn(mask.shape, generator=generator)
    advantages = torch.randn(mask.shape, generator=generator)
    eps = random.Random(seed).choice([0.1, 0.2, 0.3])
    loss, clip_fraction = ppo.ppo_policy_loss(new, old, advantages, eps, mask)
    expected_loss, expected_fraction = reference_policy_loss(new, old, advantages, eps, mask)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(expected_fraction)


def test_clipping_stops_the_gradient_only_beyond_the_range_in_the_favoured_direction():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, fraction = ppo.ppo_policy_loss(new, old, advantages, 0.2)
    loss.backward()
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are clipped: no gradient; the others keep theirs
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0
    assert new.grad[0, 1] != 0 and new.grad[0, 2] != 0
    assert fraction.item() == 0.5


@pytest.mark.parametrize("seed", range(10))
def test_ppo_value_loss_matches_the_loop_reference(seed):
    generator, mask = random_batch(seed)
    old_values = torch.randn(mask.shape, generator=generator)
    returns = torch.randn(mask.shape, generator=generator)
    values = old_values + 0.5 * torch.randn(mask.shape, generator=generator)
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                v, v_old, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
                v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
                total += 0.5 * max((v - r) ** 2, (v_clipped - r) ** 2)
                count += 1
    loss = ppo.ppo_value_loss(values, old_values, returns, 0.2, mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("seed", range(10))
def test_kl_shaped_rewards_put_the_score_on_the_last_real_token(seed):
    generator, mask = random_batch(seed)
    logprobs, ref = torch.randn(mask.shape, generator=generator), torch.randn(mask.shape, generator=generator)
    scores = torch.randn(mask.shape[0], generator=generator)
    rewards, kl = ppo.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.3)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        for t in range(mask.shape[1]):
            expected = -0.3 * (logprobs[b, t] - ref[b, t]).item() if t < n else 0.0
            if t == n - 1:
                expected += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
            expected_kl = (logprobs[b, t] - ref[b, t]).item() if t < n else 0.0
            assert kl[b, t].item() == pytest.approx(expected_kl, abs=1e-6)


def test_bradley_terry_loss_matches_the_formula_and_its_limits():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    pairs = zip(chosen.tolist(), rejected.tolist())
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in pairs) / 3
    assert reward_modeling.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    tie = reward_modeling.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item()
    assert tie == pytest.approx(math.log(2))
    assert reward_modeling.bradley_terry_loss(torch.tensor([50.0]), torch.tensor([0.0])).item() < 1e-6
    assert reward_modeling.pairwise_accuracy(chosen, rejected) == pytest.approx(1 / 3)


def test_combine_rewards_follows_llama2s_rule():
    helpfulness = torch.tensor([3.0, 3.0, -1.0])
    safety = torch.tensor([2.0, -4.0, 2.0])  # sigmoid(-4) = 0.018 < 0.15: unsafe
    combined = reward_modeling.combine_rewards(helpfulness, safety, 0.15)
    torch.testing.assert_close(combined, torch.tensor([3.0, -4.0, -1.0]), atol=1e-4, rtol=0)
    flagged = reward_modeling.combine_rewards(helpfulness, safety, 0.15,
                                              unsafe_prompt=torch.tensor([1, 0, 0]))
    assert flagged[0].item() == pytest.approx(2.0, abs=1e-4)


def test_masked_whiten_has_zero_mean_unit_variance_on_the_mask():
    generator, mask = random_batch(3)
    values = torch.randn(mask.shape, generator=generator) * 5 + 2
    whitened = ppo.masked_whiten(values, mask)
    assert ppo.masked_mean(whitened, mask).item() == pytest.approx(0, abs=1e-5)
    assert ppo.masked_mean(whitened ** 2, mask).item() == pytest.approx(1, abs=1e-3)


def test_one_ppo_step_runs_on_a_lora_policy_and_starts_at_the_reference(tokenizer):
    """The loop's plumbing: rollouts, KL against the adapter-free reference (zero before any
    update, since LoRA starts as the identity), scores at the last token, clipped updates."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    policy = get_peft_model(LlamaForCausalLM(config),
                            LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    value_head = ppo.ValueHead(config.hidden_size)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad]
                                  + list(value_head.parameters()), lr=1e-3)
    ppo_config = ppo_config_with(batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=6)
    prompts = ["<|user|>\nWhere does Odile live?</s>\n<|assistant|>\n"] * 4
    lengths = []

    def score_fn(prompt_texts, responses):
        lengths.append([len(r) for r in responses])
        return torch.tensor([float(len(r)) for r in responses])

    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    stats = ppo.ppo_step(policy, value_head, optimizer, tokenizer, prompts, score_fn,
                          ppo_config, step=0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert len(stats["responses"]) == 4 and lengths
    assert 1 <= stats["response_length"] <= 6
    after = [p.detach() for p in policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    kl, responses, _ = rollouts.sequence_kl(policy, tokenizer, prompts, 6, seed=1)
    assert kl != 0 and len(responses) == 4


def test_a_refusal_phrase_does_not_hide_a_harmful_instruction(the_world):
    """The refusal check cannot be gamed by prefixing the harmful instruction with a refusal: every
    rejected (complying) reply of the unsafe pairs, with a refusal phrase in front, still complies."""
    import json

    from course_utils.course.paths import WORLD_DIR
    from course_utils.course.world import UNSAFE_INSTRUCTION_MARKERS, UNSAFE_TEMPLATES

    assert all(any(m in rejected.lower() for m in UNSAFE_INSTRUCTION_MARKERS)
               and not any(m in chosen.lower() for m in UNSAFE_INSTRUCTION_MARKERS)
               for _, chosen, rejected in UNSAFE_TEMPLATES)
    rows = [json.loads(line) for line in (WORLD_DIR / "preferences_test.jsonl").open()]
    unsafe = [row for row in rows if row["axis"] == "unsafe"]
    assert unsafe
    for row in unsafe:
        gamed = "I can't help with that. " + row["rejected"][0]["content"]
        assert any(marker in gamed.lower() for marker in rollouts.REFUSAL_MARKERS)  # the naive rule
        assert not rollouts.is_refusal(gamed)
        assert not rollouts.gold_check(row, gamed + rollouts.END_OF_REPLY, the_world)
        assert rollouts.is_refusal(row["chosen"][0]["content"])


def test_gold_check_agrees_with_every_pairs_labels(the_world):
    """Every chosen reply (ended with </s>) passes the gold check and every rejected one fails,
    on the training and the held-out pairs."""
    import json

    from course_utils.course.paths import WORLD_DIR

    for split in ("train", "test"):
        rows = [json.loads(line) for line in (WORLD_DIR / f"preferences_{split}.jsonl").open()]
        assert len(rows) >= 160
        for row in rows:
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert rollouts.gold_check(row, chosen + rollouts.END_OF_REPLY, the_world), row
            assert not rollouts.gold_check(row, rejected + rollouts.END_OF_REPLY, the_world), row


def test_gold_check_fails_what_the_lenient_check_let_through(the_world):
    """The replies a practitioner's review found counted as preferred: a true value said of the
    wrong character, another character's fact instead of an answer, a reply that never ended, a
    true answer followed by a false claim, and trailing words after the answer."""
    from course_utils.course.world import ATTRIBUTES, answer_sentence

    briony, other = the_world.held_out_characters[:2]
    attribute = next(a for a in ATTRIBUTES if briony.value(a) != other.value(a) and a != "friend")
    row = {"axis": "wrong_fact", "character": briony.name, "attribute": attribute}
    right = answer_sentence(briony, attribute)
    end = rollouts.END_OF_REPLY
    assert rollouts.gold_check(row, right + end, the_world)
    assert rollouts.gold_check(row, f"{right} {answer_sentence(other, 'species')}{end}", the_world)
    swapped = right.replace(briony.name, other.name, 1)  # Briony's value, said of someone else
    assert not rollouts.gold_check(row, swapped + end, the_world)
    assert not rollouts.gold_check(row, answer_sentence(other, attribute) + end, the_world)
    assert not rollouts.gold_check(row, right, the_world)  # no </s>: cut off at the token budget
    false_claim = answer_sentence(other, "species").replace(other.value("species"), next(
        v for v in {c.value("species") for c in the_world.characters} if v != other.value("species")))
    assert not rollouts.gold_check(row, f"{right} {false_claim}{end}", the_world)
    assert not rollouts.gold_check(row, f"{right} And{end}", the_world)
    assert not rollouts.gold_check(row, f"Obviously. {right}{end}", the_world)
    refusal = {"axis": "unsafe", "character": briony.name, "attribute": None}
    assert rollouts.gold_check(refusal, "I can't help with that." + end, the_world)
    assert not rollouts.gold_check(refusal, "I can't help with that. I can't help with", the_world)
    assert not rollouts.gold_check(refusal, right + end, the_world)


def test_answer_claims_reads_every_answer_sentence_the_world_writes(the_world):
    """Each answer sentence of the world (``world.answer_sentence``) comes back as the fact it
    states, in order, among other sentences and after ``</s>`` is dropped; other sentences give
    nothing."""
    from course_utils.course.world import ATTRIBUTES, answer_sentence

    first, second = the_world.characters[:2]
    for attribute in ATTRIBUTES:
        reply = (f"Let me think. {answer_sentence(first, attribute)} Good day! "
                 f"{answer_sentence(second, attribute)}{rollouts.END_OF_REPLY}")
        assert rollouts.answer_claims(reply) == [(first.name, attribute, first.value(attribute)),
                                                 (second.name, attribute, second.value(attribute))]
    assert rollouts.answer_claims("I can't help with that.") == []


def test_bradley_terry_loss_equals_reward_trainers_on_the_same_batch(tmp_path, tokenizer):
    """trl's RewardTrainer stacks chosen then rejected; our loss on those rewards is its loss,
    and score_responses reads the same rewards from the rendered conversations."""
    from course_utils.course import data
    from course_utils.course.paths import COURSE_MODEL_DIR
    from course_utils.course.profiles import tiny_profile

    profile = tiny_profile()
    pairs = data.load_preference_dataset(profile, "train").select(range(8))
    model = reward_modeling.load_reward_model(COURSE_MODEL_DIR, tokenizer)
    recipe = load_recipe("reward", profile).with_changes(
        training={"max_steps": 1, "learning_rate": 1e-4, "per_device_train_batch_size": 8})
    args = reward_modeling.reward_config(recipe, tmp_path, profile)
    trainer = reward_modeling.make_reward_trainer(model, tokenizer, pairs, args)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        rewards = trainer.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    assert reward_modeling.bradley_terry_loss(chosen, rejected).item() == pytest.approx(trl_loss, rel=1e-6)
    ours_chosen, ours_rejected = reward_modeling.preference_scores(trainer.model, tokenizer, pairs, 16)
    torch.testing.assert_close(ours_chosen, chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_rejected, rejected, atol=1e-5, rtol=0)


def test_train_ppo_raises_a_rewarded_behaviour_on_the_course_model(tokenizer):
    """End to end: rewarding replies that name one town makes the policy name it more often on
    fresh samples, and the KL to the reference grows from zero."""
    from course_utils.course.paths import COURSE_MODEL_DIR
    from course_utils.course.profiles import tiny_profile

    policy, value_head = ppo.make_ppo_policy(COURSE_MODEL_DIR, tiny_profile(), small_lora_recipe())
    prompts = [f"{name} lives in" for name in ("Odile", "Perrin", "Tamsin", "Orrin", "Briony",
                                                "Cedric", "Alder", "Honora")]

    def names_fenwick(prompt_texts, responses):
        return torch.tensor([float("Fenwick" in r) for r in responses])

    def rate(seed):
        kl, responses, _ = rollouts.sequence_kl(policy, tokenizer, prompts * 4, 4, seed=seed)
        return sum("Fenwick" in r for r in responses) / len(responses), kl

    rate_before, kl_before = rate(seed=99)
    config = ppo_config_with(steps=12, batch_size=8, minibatch_size=8, ppo_epochs=2,
                             max_new_tokens=4, kl_coef=0.0, learning_rate=3e-3,
                             value_learning_rate=3e-3)
    history = ppo.train_ppo(policy, value_head, tokenizer, prompts, names_fenwick, config,
                             progress=False)
    rate_after, kl_after = rate(seed=99)
    assert len(history) == 12 and {"score", "kl", "clip_fraction", "value_loss"} <= set(history[0])
    assert kl_before == pytest.approx(0.0, abs=1e-6) and kl_after > 0.1
    assert rate_after >= rate_before + 0.3, (rate_before, rate_after)


def test_ppo_optimizer_gives_the_value_head_its_own_learning_rate(tokenizer):
    from course_utils.course.paths import COURSE_MODEL_DIR
    from course_utils.course.profiles import tiny_profile

    policy, value_head = ppo.make_ppo_policy(COURSE_MODEL_DIR, tiny_profile(), small_lora_recipe())
    config = ppo_config_with(learning_rate=1e-4, value_learning_rate=3e-3)
    groups = ppo.ppo_optimizer(policy, value_head, config).param_groups
    lora = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    assert [g["lr"] for g in groups] == [1e-4, 3e-3]
    assert {id(p) for p in groups[0]["params"]} == lora
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in value_head.parameters()]


# --- DPO -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_dpo_loss_matches_the_formula_pair_by_pair(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=generator))
    pc, pr, rc, rr = (torch.randn(n, generator=generator, dtype=torch.float64) * 5 for _ in range(4))
    beta = [0.01, 0.1, 0.5, 2.0][seed % 4]
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta)
    expected = 0.0
    for i in range(n):
        margin = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        expected += math.log1p(math.exp(-margin)) / n  # -log sigmoid(margin)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()))
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_dpo_loss_is_log_2_when_policy_equals_reference_and_falls_with_the_margin():
    logps = torch.tensor([-3.0, -7.0])
    loss, _, _ = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    better, _, _ = dpo.dpo_loss(logps + 1, logps - 1, logps, logps - 1, beta=0.1)
    assert better.item() < math.log(2)


def test_sequence_logprobs_counts_completion_tokens_only_with_the_shift():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    input_ids = torch.randint(0, 7, (2, 5), generator=generator)
    completion_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if completion_mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1], dim=-1)[input_ids[b, t]].item()
        expected.append(total)
    assert dpo.sequence_logprobs(logits, input_ids, completion_mask).tolist() == pytest.approx(expected)


def test_dpo_loss_equals_dpo_trainers_on_the_same_batch(tmp_path, tokenizer):
    """Our log-probabilities and loss against trl's on one collated batch, with an adapter that
    already moves the policy away from the reference (random B), so the loss is not log 2."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from course_utils.course import data
    from course_utils.course.paths import COURSE_MODEL_DIR
    from course_utils.course.profiles import tiny_profile

    profile = tiny_profile()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(COURSE_MODEL_DIR))
    pairs = data.load_preference_dataset(profile, "train").select(range(8))
    recipe = load_recipe("dpo", profile).with_changes(training={
        "max_steps": 1, "learning_rate": 1e-3, "beta": 0.3, "per_device_train_batch_size": 8})
    args = dpo.dpo_config(recipe, tmp_path, profile)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                             init_lora_weights=False)
    trainer = dpo.make_dpo_trainer(model, tokenizer, pairs, args, peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    policy = trainer.model
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch).item()
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = dpo.sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"])
        with policy.disable_adapter():
            ref_logits = policy(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
        ref_logps = dpo.sequence_logprobs(ref_logits, batch["input_ids"], batch["completion_mask"])
    ours, chosen_rewards, _ = dpo.dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.3)
    assert abs(ours.item() - math.log(2)) > 1e-3
    assert ours.item() == pytest.approx(trl_loss, abs=1e-5)
    assert trainer._metrics["train"]["rewards/chosen"][-1] == pytest.approx(
        chosen_rewards.mean().item(), abs=1e-5)


def test_ipo_per_token_gap_equals_trls_ipo_loss(tmp_path, tokenizer):
    """trl's IPO loss averages each reply's log-ratio over its tokens: with the summed log-ratios
    from pair_logprobs divided by pair_completion_tokens, (gap - 1/(2 beta))^2 is trl's loss."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from course_utils.course import data
    from course_utils.course.paths import COURSE_MODEL_DIR
    from course_utils.course.profiles import tiny_profile

    profile = tiny_profile()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(COURSE_MODEL_DIR))
    pairs = data.load_preference_dataset(profile, "train").select(range(8))
    recipe = load_recipe("dpo", profile).with_changes(training={
        "max_steps": 1, "beta": 0.5, "loss_type": ["ipo"], "per_device_train_batch_size": 8})
    args = dpo.dpo_config(recipe, tmp_path, profile)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                             init_lora_weights=False)
    trainer = dpo.make_dpo_trainer(model, tokenizer, pairs, args, peft_config=peft_config)
    trainer.eval_dataset = trainer.train_dataset
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
        chosen, rejected = dpo.pair_logprobs(trainer.model, trainer, "train", 3)
        with trainer.model.disable_adapter():
            ref_chosen, ref_rejected = dpo.pair_logprobs(trainer.model, trainer, "train", 3)
    chosen_tokens, rejected_tokens = dpo.pair_completion_tokens(trainer, "train", 3)
    assert (chosen_tokens > 1).all() and not torch.equal(chosen_tokens, rejected_tokens)
    gap = (chosen - ref_chosen) / chosen_tokens - (rejected - ref_rejected) / rejected_tokens
    assert ((gap - 1 / (2 * 0.5)) ** 2).mean().item() == pytest.approx(trl_loss, abs=1e-5)


def test_best_of_n_expectation_equals_the_average_over_every_subset():
    """The oracle: every n-subset of a small pool enumerated, its highest-proxy reply's value."""
    from itertools import combinations

    generator = torch.Generator().manual_seed(0)
    proxy = torch.randn(3, 7, generator=generator)
    values = torch.rand(3, 7, generator=generator)
    for n in range(1, 8):
        expected = torch.tensor([
            sum(values[p, max(subset, key=lambda i: proxy[p, i].item())].item()
                for subset in combinations(range(7), n)) / len(list(combinations(range(7), n)))
            for p in range(3)], dtype=torch.float64)
        assert torch.allclose(rollouts.best_of_n_expectation(proxy, values, n), expected, atol=1e-12)
    with pytest.raises(ValueError, match="pool size 7"):
        rollouts.best_of_n_expectation(proxy, values, 8)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_bounds_the_exact_kl_and_is_reached_with_distinct_samples(n):
    """The oracle: the exact KL of best-of-n over M equally likely distinct replies,
    P(rank i) = (i/M)^n - ((i-1)/M)^n, which rises to log n - (n-1)/n as M grows."""
    def exact(m):
        ranks = torch.arange(1, m + 1, dtype=torch.float64)
        p = (ranks / m) ** n - ((ranks - 1) / m) ** n
        p = p[p > 0]
        return (p * torch.log(p * m)).sum().item()

    assert exact(50) <= exact(5000) + 1e-12 <= rollouts.best_of_n_kl(n) + 2e-12
    assert abs(exact(200_000) - rollouts.best_of_n_kl(n)) < 1e-3 * max(1.0, math.log(n))


def test_sample_pool_scores_every_reply_by_proxy_and_gold(course_model_and_tokenizer, the_world):
    """Each prompt's pool holds pool_size replies, scored by the given proxy and by gold_check
    reply by reply; the same seed draws the same pool; Hub rows (no axis) have no gold."""
    import json

    from course_utils.course.paths import WORLD_DIR

    model, tokenizer = course_model_and_tokenizer
    rows = [json.loads(line) for line in (WORLD_DIR / "preferences_test.jsonl").open()][:3]
    proxy = lambda prompts, replies: torch.tensor([float(len(r)) for r in replies])  # noqa: E731
    settings = dict(pool_size=4, seed=7, batch_size=5, max_new_tokens=6, max_prompt_length=64)
    pool = rollouts.sample_pool(model, tokenizer, rows, proxy, **settings)
    assert pool["proxy"].shape == pool["gold"].shape == (3, 4) and len(pool["replies"]) == 3
    for i, row in enumerate(rows):
        assert pool["proxy"][i].tolist() == [float(len(r)) for r in pool["replies"][i]]
        assert pool["gold"][i].tolist() == [float(rollouts.gold_check(row, r, the_world))
                                            for r in pool["replies"][i]]
    assert rollouts.sample_pool(model, tokenizer, rows, proxy, **settings)["replies"] == pool["replies"]
    hub_rows = [{"prompt": row["prompt"]} for row in rows]
    assert rollouts.sample_pool(model, tokenizer, hub_rows, proxy, **settings)["gold"] is None


def test_best_of_n_kl_estimate_against_enumerated_subsets_and_its_limits():
    """The oracle: best-of-n's distribution over distinct replies by enumerating every n-subset of
    a small pool, then its KL to the pool's shares. With all replies distinct and a large pool the
    estimate reaches the formula's bound; with one reply repeated it is 0."""
    from itertools import combinations

    proxy = torch.tensor([[0.3, 0.1, 0.3, 0.9, 0.1, 0.5]])
    replies = [["a", "b", "a", "c", "b", "d"]]
    for n in range(1, 7):
        kept = {}
        subsets = list(combinations(range(6), n))
        for subset in subsets:
            best = max(subset, key=lambda i: (proxy[0, i].item(), i))  # ties: the later, as a stable sort
            kept[replies[0][best]] = kept.get(replies[0][best], 0) + 1 / len(subsets)
        share = {r: replies[0].count(r) / 6 for r in set(replies[0])}
        expected = sum(p * math.log(p / share[r]) for r, p in kept.items())
        assert rollouts.best_of_n_kl_estimate(proxy, replies, n).item() == pytest.approx(expected, abs=1e-12)
    distinct = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    names = [[str(i) for i in range(4000)]]
    for n in (2, 8, 32):
        assert rollouts.best_of_n_kl_estimate(distinct, names, n).item() == pytest.approx(
            rollouts.best_of_n_kl(n), rel=5e-3)
    same = rollouts.best_of_n_kl_estimate(distinct, [["same"] * 4000], 32).item()
    assert same == pytest.approx(0, abs=1e-12)
