"""Load a profile's data: the synthetic world's files, or the Hub data sets the literature uses.

Both sources end in the same schemas, so every lesson's formatting code sees one shape:

- SFT chats: UltraChat's ``{"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}``
  (``HuggingFaceH4/ultrachat_200k``, split ``test_sft``, 3,000 rows shuffled with seed 42 on
  the ``colab`` profile; ``data/world/sft_*.jsonl`` on ``tiny``).
- Preference pairs: trl's conversational ``{"prompt": [...], "chosen": [...], "rejected": [...]}``
  (``argilla/distilabel-intel-orca-dpo-pairs`` filtered as in the literature on ``colab``;
  ``data/world/preferences_*.jsonl`` on ``tiny``, with an extra ``axis`` column).

The Hub loaders take ``path_or_id``: a Hub id, or a local ``.jsonl`` file in the Hub schema.
Tests pass the shipped samples in ``data/samples/`` so the Hub code path runs without a network.
``preference_rows`` turns either source's pairs into the rows trl's reward and DPO trainers read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from course_utils.course.paths import SAMPLES_DIR, WORLD_DIR
from course_utils.course.profiles import Profile
from course_utils.course.recipes import load_recipe
from course_utils.course.rehearsal import FILES

ULTRACHAT_ID = "HuggingFaceH4/ultrachat_200k"
ORCA_DPO_ID = "argilla/distilabel-intel-orca-dpo-pairs"
ULTRACHAT_SAMPLE = SAMPLES_DIR / "ultrachat_200k_test_sft.jsonl"
MMLU_ID = "cais/mmlu"
ORCA_DPO_SAMPLE = SAMPLES_DIR / "distilabel_intel_orca_dpo_pairs_train.jsonl"
ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A data row that does not have the schema a lesson expects."""


#: the parquet files of one split in each Hub data set: without ``data_files``, ``load_dataset``
#: downloads every split (UltraChat's four are 1.6 GB; lesson 07 needs 3,000 rows of one)
HUB_SPLIT_FILES = {
    ULTRACHAT_ID: "data/{split}-*.parquet",
    ORCA_DPO_ID: "data/{split}-*.parquet",
    MMLU_ID: "all/{split}-*.parquet",
}


def _load(path_or_id: str | Path, split: str):
    """A ``datasets.Dataset`` from a local JSON-lines file, or one split of a Hub data set (only
    that split's files are downloaded)."""
    from datasets import load_dataset

    path = Path(str(path_or_id))
    if path.suffix in (".jsonl", ".json"):
        if not path.exists():
            raise FileNotFoundError(f"no data file at {path}; regenerate the world with "
                                    "`python -m course_utils.course.world` (the rehearsal rows with "
                                    "`python -m course_utils.course.rehearsal`) or check your checkout")
        return load_dataset("json", data_files=str(path), split="train")
    pattern = HUB_SPLIT_FILES.get(str(path_or_id))
    if pattern is None:
        return load_dataset(str(path_or_id), split=split)
    return load_dataset(str(path_or_id), data_files={split: pattern.format(split=split)},
                        split=split)


def hub_source(profile: Profile, kind: str, hub_id: str) -> str | Path:
    """Where a Hub loader reads for ``profile``: the Hub id, or the rehearsal's shipped rows in
    the same schema (``kind``: a key of ``course_utils.course.rehearsal.FILES``)."""
    if profile.hub_data_dir is None:
        return hub_id

    return Path(profile.hub_data_dir) / FILES[kind]


def validate_messages(messages, where: str = "row") -> None:
    """Raise ``DataFormatError`` unless ``messages`` is a list of role/content dicts that has at
    least one user turn followed, eventually, by an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise DataFormatError(f"{where}: message {i} needs 'role' and 'content' keys, got "
                                  f"{message!r:.80}")
        if message["role"] not in ROLES:
            raise DataFormatError(f"{where}: message {i} has role {message['role']!r}; "
                                  f"expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataFormatError(f"{where}: message {i} content must be text")
    roles = [m["role"] for m in messages]
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        raise DataFormatError(f"{where}: needs a user turn followed by an assistant turn, "
                              f"got roles {roles}")


def validate_sft_rows(dataset) -> None:
    """Check every row of an SFT data set has a valid UltraChat ``messages`` list."""
    for index, row in enumerate(dataset):
        if "messages" not in row:
            raise DataFormatError(f"row {index}: no 'messages' column (columns: {list(row)})")
        validate_messages(row["messages"], f"row {index}")


def load_ultrachat(path_or_id: str | Path = ULTRACHAT_ID, split: str = "test_sft", *, n_rows: int,
                   seed: int):
    """``n_rows`` UltraChat chats of ``split``, shuffled with ``seed`` (the colab data recipe's
    ``sft`` section: the literature's QLoRA SFT subset)."""
    dataset = _load(path_or_id, split).shuffle(seed=seed)
    dataset = dataset.select(range(min(n_rows, len(dataset))))
    validate_sft_rows(dataset)
    return dataset


def load_sft_dataset(profile: Profile, split: str = "train"):
    """The SFT chats for ``profile``: world chats (``train``: SFT characters; ``test``: held-out
    characters) on ``tiny``, the UltraChat subset on ``colab``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if profile.data_source == "hub":
        selection = load_recipe("data", profile).sft
        hub_split = "test_sft" if split == "train" else "test_gen"
        return load_ultrachat(hub_source(profile, f"sft_{split}", ULTRACHAT_ID), split=hub_split,
                              n_rows=selection[f"{split}_rows"], seed=selection["seed"])
    dataset = _load(WORLD_DIR / f"sft_{split}.jsonl", "train")
    validate_sft_rows(dataset)
    return dataset


def orca_pair_to_conversation(row: dict) -> dict:
    """One Orca DPO pairs row as trl's conversational preference row.

    The row's ``system`` message (when non-empty) and ``input`` become the prompt; ``chosen`` and
    ``rejected`` become single assistant turns.
    """
    for key in ("input", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise DataFormatError(f"Orca DPO row needs text in {key!r}, got {row.get(key)!r:.80}")
    prompt = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    prompt.append({"role": "user", "content": row["input"]})
    return {"prompt": prompt,
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def keep_orca_pair(row: dict, min_chosen_score: float) -> bool:
    """The literature's filter: no ties, a chosen score of at least 8, and not in GSM8K's train
    split (which would contaminate a GSM8K evaluation)."""
    return (row["status"] != "tie" and row["chosen_score"] is not None
            and row["chosen_score"] >= min_chosen_score and not row["in_gsm8k_train"])


def load_orca_dpo_pairs(path_or_id: str | Path = ORCA_DPO_ID, *, min_chosen_score: float,
                        split: str = "train"):
    """The filtered Orca DPO pairs in trl's conversational schema."""
    dataset = _load(path_or_id, split).filter(keep_orca_pair,
                                              fn_kwargs={"min_chosen_score": min_chosen_score})
    return dataset.map(orca_pair_to_conversation, remove_columns=dataset.column_names)


def load_preference_dataset(profile: Profile, split: str = "train"):
    """Preference pairs for ``profile``: the world's pairs (with ``axis``) or Orca DPO pairs.

    The Orca data set has one split; ``test`` is the colab data recipe's held-out fraction of it,
    after a seeded shuffle.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if profile.data_source == "hub":
        selection = load_recipe("data", profile).preferences
        parts = load_orca_dpo_pairs(hub_source(profile, "preferences", ORCA_DPO_ID),
                                    min_chosen_score=selection["min_chosen_score"]).train_test_split(
            test_size=selection["test_fraction"], seed=selection["seed"])
        return parts[split]
    return _load(WORLD_DIR / f"preferences_{split}.jsonl", "train")


MMLU_SAMPLE = SAMPLES_DIR / "mmlu_all_test.jsonl"


def mmlu_row(row: dict, index: int = 0) -> dict:
    """An MMLU row (``question``, ``subject``, ``choices`` (4), ``answer`` as an index 0-3) in the
    course's multiple-choice schema (``question``, ``choices``, ``answer`` as a letter)."""
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) != 4 or answer not in (0, 1, 2, 3):
        raise DataFormatError(f"row {index}: MMLU needs 4 'choices' and an 'answer' index 0-3, "
                              f"got choices={choices!r:.80} answer={answer!r}")
    return {"id": f"mmlu-{row.get('subject', 'unknown')}-{index}", "question": row["question"],
            "choices": list(choices), "answer": "ABCD"[answer]}


def load_mmlu_subset(n_rows: int = 200, path_or_id: str | Path = MMLU_ID, seed: int = 0) -> list[dict]:
    """``n_rows`` MMLU test questions (all subjects, seeded shuffle) in the course's schema; the
    ``colab`` profile's benchmark in lesson 11. ``path_or_id`` may be a local JSON-lines file in
    the Hub schema (``data/samples/mmlu_all_test.jsonl``)."""
    path = Path(str(path_or_id))
    if path.suffix == ".jsonl":
        dataset = _load(path, "train")
    else:
        dataset = _load(path_or_id, "test")
    dataset = dataset.shuffle(seed=seed).select(range(min(n_rows, len(dataset))))
    return [mmlu_row(row, i) for i, row in enumerate(dataset)]


def fingerprint(profile: Profile, kind: str) -> str:
    """What a stage trains on, as a string that changes when the data does: the hash of the world's
    file, or the Hub data set (or the rehearsal's sample of it) and the hash of the data recipe
    that selects from it. ``kind``: ``"sft"`` or ``"preferences"``."""
    if kind not in ("sft", "preferences"):
        raise ValueError(f"kind must be 'sft' or 'preferences', got {kind!r}")
    if profile.data_source == "hub":
        if profile.hub_data_dir is not None:
            path = Path(profile.hub_data_dir) / FILES["sft_train" if kind == "sft" else kind]
            source = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            source = "hub:" + (ULTRACHAT_ID if kind == "sft" else ORCA_DPO_ID)
        return f"{source}; selected by data recipe sha256:{load_recipe('data', profile).sha256}"
    path = WORLD_DIR / f"{kind}_train.jsonl"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def preference_rows(dataset):
    """trl's conversational preference rows (``prompt``, ``chosen``, ``rejected``), rendered with
    ``<s>`` first like every other stage of the course (``qlora_sft.TRAINING_CHAT_TEMPLATE``)."""
    keep = ("prompt", "chosen", "rejected")
    return dataset.map(lambda row: {"chat_template_kwargs": {"add_bos": True}},
                       remove_columns=[c for c in dataset.column_names if c not in keep])
