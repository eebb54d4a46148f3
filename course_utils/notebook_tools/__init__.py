"""Running, testing and publishing the notebooks.

- ``run_notebooks``: ``make run``, every lesson in order with papermill, and the run record.
- ``pytest_notebooks``: the pytest plugin that makes each lesson a test (``make test``).
- ``portability``: ``make portability``, each lesson under other seeds, thread counts and CPU
  kernels, and the reports in ``portability/``.
- ``site``: the executed course as a static site (``make site``); ``browser``: the Chromium its
  checks and JupyterLab's drive, chosen first by ``make test`` (or one message saying what to
  install).
- ``lab_time``: each lesson's reading-time estimate (its header line), the README's reading
  column and lab plan.
- ``drift``: ``make drift``, the tests and lessons under the newest releases the index offers.
- ``colab``: the set-up cell every notebook opens with and ``set_up_notebook``, which it calls
  (on Colab it installs the pinned packages; everywhere it hides the library notices);
  ``python -m course_utils.notebook_tools.colab`` rewrites the cell and badges.
"""
