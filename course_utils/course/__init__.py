"""What every lesson stands on: the course's settings, materials and records.

- ``paths``: where the repository, the shipped data and the (git-ignored) artifacts live.
- ``profiles``: the ``tiny`` (CPU, course model), ``colab`` (T4, TinyLlama) and ``rehearsal``
  profiles; ``rehearsal``: the T4 path run on a CPU (stand-in model, Hub-schema samples, caps).
- ``recipes``: every training and evaluation setting, read from ``configs/recipes/``, and what a
  run actually used compared with them (``ran_with``, ``check_ran_with_recipe``).
- ``stages``: saved stage models with the record of what built them (``save_stage``,
  ``why_stale``); ``course_utils.pipeline`` rebuilds a missing or stale one.
- ``world``: the synthetic world and every data set drawn from it (``python -m
  course_utils.course.world``); ``data``: SFT chats and preference pairs for a profile (world
  files or Hub data sets).
- ``models``: load a profile's model and tokenizer, optionally in 4-bit NF4.
- ``chat``: TinyLlama's chat template, rendering, and assistant-only label masks.
- ``reporting``: each notebook's ``metrics.json``, its checked claims, and the summary table.
- ``predict``: predict-then-run moments, a learner's guess compared with what the lesson measured.
- ``gpu_trace``: GPU memory of a step traced at full scale under fake tensors (for
  ``course_utils.budget`` and its ``--trace``).

Nothing here imports a lesson module or a tool (``tests/test_package_layout.py``).
"""
