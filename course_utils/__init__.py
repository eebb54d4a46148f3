"""Helpers for the notebook course "Fine-tuning LLMs, from memory math to DPO".

Modules, each named for what it holds:

- ``profiles``: the ``tiny`` (CPU, course model) and ``colab`` (T4, TinyLlama) profiles.
- ``recipes``: every training and evaluation setting, read from ``configs/recipes/``.
- ``stages``: saved stage models with the record of what built them, reused only while it
  matches; ``ensure_stage`` rebuilds a missing or stale one from its recipe.
- ``world``: the synthetic world and every data set drawn from it (``python -m course_utils.world``).
- ``build_course_model``: the tokenizer and the small Llama pretrained on the world's corpus.
- ``models``: load a profile's model and tokenizer, optionally in 4-bit NF4.
- ``data``: SFT chats and preference pairs for a profile (world files or Hub data sets).
- ``chat``: TinyLlama's chat template, rendering, and assistant-only label masks.
- ``training``: a minimal full-SFT loop (the tour, and rebuilding a missing SFT model).
- ``evaluation``: fact completion and chat-format probes.
- ``metrics``: each notebook's ``metrics.json`` and the summary table.
- ``run_notebooks``: ``make run``, every notebook in order with papermill.
- ``colab``: the Colab badge and install cell every notebook opens with.
- ``exercises``: generate ``exercises/`` from ``solutions/`` (``make exercises``).
- ``grade`` and ``grading``: the autograder and the checks graded cells call.
"""

__version__ = "0.1.0"
