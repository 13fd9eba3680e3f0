# Two commands do all the set-up on a fresh machine:
#   make run    prune the embedded SmolLM2-135M with Wanda on real Wikipedia text (dense + pruned perplexity)
#   make test   run the test suite
# Both create .venv in the checkout when missing and install into it once (a re-run takes seconds).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast venv assets bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) cli.py prune --config configs/llm/smollm2_wikipedia.yaml

# One pytest worker per core, each with one torch thread: most tests are small models or processes of
# their own that a second thread barely helps, and two workers' OpenMP threads on one core thrash.
# worksteal: a worker that runs out takes queued tests from the other, so the suite does not end on
# one worker finishing a queue of slow ones.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

test: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/pytest -q -n auto --dist worksteal --durations=40

test-fast: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/pytest -q -n auto --dist worksteal -m "not slow"

assets: $(STAMP)
	$(PY) cli.py assets

clean:
	rm -rf $(VENV) outputs .pytest_cache
