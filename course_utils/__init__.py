"""Helpers for the notebook course "Fine-tuning LLMs, from memory math to DPO".

The modules at this level each back a lesson (the README's course map names them):

- ``probes`` (00): fact completion and chat-format probes, used again in later lessons;
  ``sft_loop`` (00, 02-05): a minimal full-SFT loop in plain PyTorch.
- ``memory`` (01) and ``budget`` (01's model applied to the colab recipes).
- ``peft_scratch`` (02-05): the methods written out; ``peft_comparison`` (02-05): every method
  trained and measured the same way.
- ``numerics`` (02-11): tolerance checks against a reference, per-token log-probabilities,
  held-out loss.
- ``nf4`` (06), ``qlora_sft`` (07), ``reward_modeling`` (08), ``rl_primer`` and ``ppo`` (09),
  ``dpo`` (10), ``evaluation`` (11); ``rollouts`` (09-11): sampling replies from a policy and
  measuring them.
- ``pipeline`` (08-11): an earlier lesson's model, rebuilt by that lesson's code when missing or stale.

Subpackages hold what the lessons stand on and what runs around them:

- ``course``: profiles, recipes, saved stages, the world, data, models, chat format, reporting;
- ``grading``: the exercises' release, the autograder, its verdict process and sandbox;
- ``notebook_tools``: running, testing and publishing the notebooks (``make run``, the pytest
  plugin, ``make portability``, ``make site``, the Colab set-up cell);
- ``builds``: the course model's build (``make course-model``).

Imports point from tools to lessons to ``course``, never back (``tests/test_package_layout.py``).
"""

import logging
import warnings

__version__ = "0.1.0"

#: Notices the libraries print from their own code, which no lesson discusses; each is named by
#: its exact text, so that every other warning still shows.
#: 1. peft and trl call ``model.gradient_checkpointing_enable()`` / ``_disable()`` and read
#:    ``model.is_gradient_checkpointing``, which transformers 5 renamed (``activation_checkpointing_*``);
#:    the course's own code uses the new names (tests/test_lesson_code.py checks).
DEPRECATED_IN_LIBRARIES = (r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                           r"gradient_checkpointing_disable)` is deprecated")
#: 2. peft's prompt-learning models (lesson 03) ignore the position ids that ``generate()`` passes
#:    them, and say so on every call: peft assigns the positions itself (its virtual tokens come first).
POSITION_IDS_IGNORED = r"Position ids are not supported for parameter efficient tuning"
#: 3. transformers 5 logs a "LOAD REPORT" table when a checkpoint's weights and the model's differ.
#:    A reward model made from a language model (lessons 08-11) always differs the same way: the LM
#:    head is dropped and the scalar head ``score`` is new. Lesson 08 prints those two lists itself
#:    (``from_pretrained(..., output_loading_info=True)``); a report with any other key still shows.
HEAD_SWAP_REPORT = {"lm_head.weight": "UNEXPECTED", "score.weight": "MISSING"}
#: 4. bitsandbytes 0.50, on a CPU with AVX512-BF16, tries to fetch a faster kernel from the Hub when
#:    it is imported and logs the failure; its built-in CPU kernels are the ones the course uses.
#:    So the call must come before bitsandbytes (or peft, or trl) is imported.
KNOWN_NOTICES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}
LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _DropHeadSwapReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "LOAD REPORT" not in message:
            return True
        rows = {}
        for line in message.splitlines():
            cells = [cell.strip() for cell in line.split("|")]
            if len(cells) >= 2 and cells[1] in ("UNEXPECTED", "MISSING", "MISMATCH", "CONVERSION"):
                rows[cells[0]] = cells[1]
        return rows != HEAD_SWAP_REPORT


def hide_library_notices() -> None:
    """Silence the four notices above, and nothing else. Every notebook's set-up cell calls it
    (``notebook_tools.colab.set_up_notebook``), as do ``tests/conftest.py`` and ``scripts/``."""
    warnings.filterwarnings("ignore", message=DEPRECATED_IN_LIBRARIES, category=FutureWarning)
    warnings.filterwarnings("ignore", message=POSITION_IDS_IGNORED, category=UserWarning)
    for logger, prefix in KNOWN_NOTICES.items():
        if not any(isinstance(f, _DropNotice) for f in logging.getLogger(logger).filters):
            logging.getLogger(logger).addFilter(_DropNotice(prefix))
    report_logger = logging.getLogger(LOAD_REPORT_LOGGER)
    if not any(isinstance(f, _DropHeadSwapReport) for f in report_logger.filters):
        report_logger.addFilter(_DropHeadSwapReport())


def hide_housekeeping_bars() -> None:
    """No progress bars for loading or saving weights (transformers) or for mapping a data set
    (datasets, which trl's trainers call to tokenize): a lesson that loads six models showed six
    bars that say nothing about the lesson. Training shows its own bar, once per run, and Hub
    downloads (the ``colab`` profile) keep theirs: the learner waits on those."""
    import datasets
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also turns off the Hub's bars: back on below
    huggingface_hub.utils.enable_progress_bars()
    datasets.disable_progress_bars()
