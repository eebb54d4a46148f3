"""Helpers for the notebook course "Fine-tuning LLMs, from memory math to DPO".

Modules, each named for what it holds:

- ``profiles``: the ``tiny`` (CPU, course model) and ``colab`` (T4, TinyLlama) profiles.
- ``world``: the synthetic world and every data set drawn from it.
- ``chat``: TinyLlama's chat template and helpers to format conversations.
- ``build_course_model``: the tokenizer and the small Llama pretrained on the world's corpus.
- ``models``: load a profile's model and tokenizer, optionally in 4-bit NF4.
- ``data``: load SFT chats and preference pairs for a profile (world files or Hub data sets).
- ``evaluation``: fact completion and chat-format probes.
- ``metrics``: write and collect each notebook's ``metrics.json``.
"""

__version__ = "0.1.0"
