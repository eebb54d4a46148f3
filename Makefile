# Two commands: `make run` executes every notebook, `make test` runs every test.
# Both create .venv from requirements.txt on first use; nothing else needs installing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= auto
# Offline by design: the tiny profile never needs the network, and a stray download fails fast.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

.PHONY: help install run test portability drift site browser lab exercises world course-model t4-check lint clean

help:
	@echo "make run           execute every notebook in order (PROFILE=$(PROFILE)), print the metrics table"
	@echo "make test          run the whole test suite (unit tests, every notebook, grader)"
	@echo "make portability   rerun stale lessons under 3 seeds, 1/2/4 threads and other CPU kernels: portability/"
	@echo "make drift         the tests and lessons under the newest releases of the HF stack and torch: drift/"
	@echo "make site          the executed course as a static site: artifacts/site/html/index.html"
	@echo "make browser       find (or install) the Chromium for the browser checks, as make test does first"
	@echo "make lab           open JupyterLab on the notebooks"
	@echo "make exercises     regenerate exercises/ from solutions/"
	@echo "make world         regenerate data/world/ from its seed"
	@echo "make course-model  rebuild data/course-model/ (about 7 minutes on 2 cores)"
	@echo "make t4-check      on a CUDA GPU: lessons 07-11 at full scale capped to a T4's 15 GB: t4/measured.json"

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(OFFLINE) COURSE_PROFILE=$(subst auto,,$(PROFILE)) $(PY) -m course_utils.notebook_tools.run_notebooks

# Two workers, one thread each (tests/conftest.py): the lessons first, 07-11 in order on one worker
# (they share artifacts/models), then the test modules, each on one worker. First, in seconds, the
# Chromium for the browser checks (notebook_tools/browser.py: the system's, Playwright's, or one it
# can install; else one message saying what to install). Every lesson's executed
# copy lands in artifacts/executed/ (lesson 00's from tests/test_jupyterlab.py, which runs it through
# JupyterLab's UI, strict claims included); the second run builds the site and checks it in Chromium.
TEST_ENV := $(OFFLINE) OMP_NUM_THREADS=1 COURSE_PROFILE=tiny COURSE_STRICT_CLAIMS=1
test: $(STAMP)
	@chromium="$$($(PY) -m course_utils.notebook_tools.browser)" || exit 1; \
	$(TEST_ENV) COURSE_CHROMIUM="$$chromium" $(PY) -m pytest notebooks tests --ignore=tests/test_site.py --deselect notebooks/00_setup_and_tour.ipynb -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 && \
	$(TEST_ENV) COURSE_CHROMIUM="$$chromium" $(PY) -m pytest tests/test_site.py --durations=5

# Every lesson whose report in portability/ is stale (or LESSONS="04 09", or LESSONS=--all), under the
# variations of course_utils/notebook_tools/portability.py: two more seeds, 2 and 4 threads, other CPU
# kernels. LESSONS=--carry, after an edit meant to change no number, reruns only the reference
# variation and keeps the other runs where it measured the same numbers. The reports are committed;
# tests/test_portability.py fails when one no longer matches its lesson.
portability: $(STAMP)
	$(OFFLINE) $(PY) -m course_utils.notebook_tools.portability $(LESSONS)

# The unit tests and every lesson (tiny) in artifacts/drift-venv, built from requirements.txt with the newest
# releases the index offers of the Hugging Face stack, bitsandbytes and torch; writes drift/REPORT.md.
# Weekly in CI (.github/workflows/drift.yml). About 25 minutes on 2 cores once artifacts/drift-venv exists.
drift: $(STAMP)
	$(OFFLINE) $(PY) -m course_utils.notebook_tools.drift $(DRIFT_ARGS)

# the executed course (artifacts/executed/, from `make run` or `make test`) as a static site
site: $(STAMP)
	$(PY) -m course_utils.notebook_tools.site

# The Chromium the browser checks use, found or installed as `make test` does it (it runs this first)
browser: $(STAMP)
	@$(PY) -m course_utils.notebook_tools.browser

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

exercises: $(STAMP)
	$(PY) -m course_utils.grading.make_exercises

world: $(STAMP)
	$(PY) -m course_utils.course.world

course-model: $(STAMP)
	$(OFFLINE) $(PY) -m course_utils.builds.course_model

# On a machine with a CUDA GPU and no network: every budget phase at full size, then lessons 07-11 on
# a full-size random stand-in (TinyLlama's configuration and vocabulary, the colab recipes' settings,
# the rehearsal's few shipped rows), memory capped to a T4's 15 GB and fp16 forced; peak memory and
# minutes per phase, lesson and cell beside the budget's predictions in t4/measured.json
# (scripts/t4_check.py; T4_ARGS="--phases" for the phases only).
t4-check: $(STAMP)
	$(OFFLINE) $(PY) scripts/t4_check.py $(T4_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check course_utils tests scripts notebooks solutions exercises

clean:
	rm -rf artifacts .pytest_cache
