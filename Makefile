# Two entry points that work on a fresh machine: `make demo` and `make test`.
# TORCH picks the torch build installed before everything else (default: the CPU wheel; on GPU machines use e.g.
# `make TORCH=torch test`).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO := runs/demo

.PHONY: install demo test lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,hf]" -c tools/constraints.txt
	touch $@

demo: install
	$(PY) tools/train_tokenizer.py --input stdlib --vocab-size 4096 --out $(DEMO)/tokenizer
	$(PY) tools/prepare_data.py --input stdlib --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data
	$(PY) -m mambatron.train --config configs/tiny.yaml --set train.out_dir=$(DEMO)/run \
		data.index=$(DEMO)/data/index.json data.tokenizer=$(DEMO)/tokenizer
	$(PY) tools/export_hf.py --checkpoint $(DEMO)/run --out $(DEMO)/hf --overwrite
	$(PY) tools/sample.py --hf $(DEMO)/hf --prompt "def main(" --max-new-tokens 64

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=25 tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-demo:
	rm -rf $(DEMO)
