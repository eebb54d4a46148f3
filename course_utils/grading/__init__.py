"""The graded exercises: their release, the autograder and what it protects.

- ``make_exercises``: generates ``exercises/`` from ``solutions/`` (``make exercises``).
- ``grade``: the autograder (``python -m course_utils.grading.grade PATH...``).
- ``checks``: what graded cells call (``check_equal``, ``grader_rng``, ...).
- ``verdict``: the verdict process, which runs the test cells apart from the student's code and
  talks to the student's kernel in plain data (not lesson 11's reward-model "judge").
- ``sandbox``: starts the student's kernel inside its limits.
"""
