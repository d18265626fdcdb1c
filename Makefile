# Two entry points that work on a fresh machine: `make demo` and `make test`.
# TORCH picks the torch build installed before everything else (default: the CPU wheel; on GPU machines use e.g.
# `make TORCH=torch test`).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO := runs/demo
# The model `make demo` trains: configs/tiny.yaml (Mamba2), or e.g. `make demo CONFIG=configs/hybrid-tiny.yaml`.
CONFIG ?= configs/tiny.yaml
RUN := $(DEMO)/run-$(basename $(notdir $(CONFIG)))

.PHONY: install demo test lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/constraints.txt
	@echo "installing $(TORCH) and mambatron's dependencies into $(VENV) (a few minutes; pip is quiet meanwhile)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,hf]" -c tools/constraints.txt
	touch $@

# The tokenizer and the shards are built once and reused by later runs (`make clean-demo` starts over); the
# training run resumes from its newest checkpoint, so a finished demo only re-exports and samples.
$(DEMO)/tokenizer/mambatron_tokenizer.json: | $(VENV)/.installed
	$(PY) tools/train_tokenizer.py --input stdlib --vocab-size 4096 --out $(DEMO)/tokenizer

$(DEMO)/data/index.json: $(DEMO)/tokenizer/mambatron_tokenizer.json
	$(PY) tools/prepare_data.py --input stdlib --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data

demo: install $(DEMO)/data/index.json
	$(PY) -m mambatron.train --config $(CONFIG) --set train.out_dir=$(RUN) \
		data.index=$(DEMO)/data/index.json data.tokenizer=$(DEMO)/tokenizer
	$(PY) tools/export_hf.py --checkpoint $(RUN) --out $(RUN)-hf --overwrite
	$(PY) tools/sample.py --hf $(RUN)-hf --prompt "def main(" --max-new-tokens 64

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=25 tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-demo:
	rm -rf $(DEMO)
