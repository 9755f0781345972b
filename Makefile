# One-command set-up, tests and demo. Works on a fresh machine with only python3 and the registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint demo study bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch==2.13.0 first: it is the CPU wheel on disk; the project's own range (torch>=2.4) is then met.
$(STAMP): pyproject.toml $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet ".[test,dev]"
	touch $(STAMP)

setup: $(STAMP)
	$(PIP) install --quiet --no-deps --force-reinstall . >/dev/null

TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The whole suite, with the 15 slowest tests listed at the end.
test: setup
	$(TEST_ENV) $(PY) -m pytest -q tests --durations=15

# Everything not marked slow (pyproject.toml's `slow` marker): every module's basic behaviour.
test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -q tests -m "not slow"

# ruff, configured in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/mergekit-ace demo --output demo-output

# The demo's pipeline over the five seeds of the committed study (studies/realistic) in the
# realistic regime (bf16 checkpoints merged in bf16), every merge variant, and the covariance
# analysis; then the same models unrounded and merged in float32 (trained once for both; cached
# training and finished seeds are reused).
study: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/mergekit-ace study --config realistic --seeds 0 1 2 3 4 --output study-output
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/mergekit-ace study --config realistic-float32 --seeds 0 1 2 3 4 --output study-output-float32 --cache study-output/cache

clean:
	rm -rf $(VENV) build dist demo-output study-output study-output-float32
