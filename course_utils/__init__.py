"""Helpers for the notebook course "Fine-tuning LLMs, from memory math to DPO".

Modules, each named for what it holds. Plumbing every lesson uses:

- ``profiles``: the ``tiny`` (CPU, course model), ``colab`` (T4, TinyLlama) and ``rehearsal``
  profiles; ``rehearsal``: the T4 path run on a CPU (stand-in model, Hub-schema samples, caps).
- ``recipes``: every training and evaluation setting, read from ``configs/recipes/``.
- ``stages``: saved stage models with the record of what built them, reused only while it
  matches; ``ensure_stage`` rebuilds a missing or stale one from its recipe.
- ``world``: the synthetic world and every data set drawn from it (``python -m course_utils.course.world``).
- ``build_course_model``: the tokenizer and the small Llama pretrained on the world's corpus.
- ``models``: load a profile's model and tokenizer, optionally in 4-bit NF4.
- ``data``: SFT chats and preference pairs for a profile (world files or Hub data sets).
- ``chat``: TinyLlama's chat template, rendering, and assistant-only label masks.
- ``numerics``: tolerance checks against a reference, per-token log-probabilities, held-out loss.
- ``reporting``: each notebook's ``metrics.json``, its checked claims, and the summary table.
- ``run_notebooks``: ``make run``, every notebook in order with papermill.
- ``colab``: the Colab badge and install cell every notebook opens with.

One module per lesson (the README's course map names them):

- ``probes`` (00): fact completion and chat-format probes, used again in later lessons;
  ``sft_loop`` (00, 02-05): a minimal full-SFT loop in plain PyTorch.
- ``memory`` (01) and ``budget`` (01's model applied to the colab recipes).
- ``peft_scratch`` (02-05): the methods written out; ``peft_comparison`` (02-05): every method
  trained and measured the same way.
- ``nf4`` (06), ``qlora_sft`` (07), ``reward_modeling`` (08), ``rl_primer`` and ``ppo`` (09),
  ``dpo`` (10), ``evaluation`` (11); ``policies`` (09-11): sampling and measuring a policy.

Exercises: ``exercises`` generates ``exercises/`` from ``solutions/`` (``make exercises``);
``grade`` is the autograder (``python -m course_utils.grading.grade``); ``checks`` holds what graded
cells call; ``judge`` runs the test cells in a process of their own and talks to the student's
kernel in plain data; ``sandbox`` starts that kernel inside its limits.
"""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Notices the libraries print from their own code, which no lesson discusses; silenced here,
# each by its exact text, so that every other warning still shows.
# 1. peft and trl call `model.gradient_checkpointing_enable()` / `_disable()` and read
#    `model.is_gradient_checkpointing`, which transformers 5 renamed (`activation_checkpointing_*`);
#    the course's own code uses the new names (tests/test_lesson_code.py checks).
DEPRECATED_IN_LIBRARIES = (r"`(is_gradient_checkpointing|gradient_checkpointing_enable|"
                           r"gradient_checkpointing_disable)` is deprecated")
_warnings.filterwarnings("ignore", message=DEPRECATED_IN_LIBRARIES, category=FutureWarning)
# 2. peft's prompt-learning models (lesson 03) ignore the position ids that `generate()` passes
#    them, and say so on every call: peft assigns the positions itself (its virtual tokens come first).
_warnings.filterwarnings("ignore", message=r"Position ids are not supported for parameter efficient tuning",
                         category=UserWarning)
# 3. bitsandbytes 0.50, on a CPU with AVX512-BF16, tries to fetch a faster kernel from the Hub when
#    it is imported and logs the failure; its built-in CPU kernels are the ones the course uses.
#    Notebooks import course_utils before peft, trl or bitsandbytes for this reason.
KNOWN_NOTICES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


class _DropNotice(_logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


for _logger, _prefix in KNOWN_NOTICES.items():
    _logging.getLogger(_logger).addFilter(_DropNotice(_prefix))
