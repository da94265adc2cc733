# The book's two commands are `make book` and `make test`; see README.md.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: book test export check-export data lab bench venv train

# (Re)install when pyproject.toml changes; pip's cache makes a rerun cheap.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

export: $(STAMP)
	$(VENV)/bin/nbdev-export

# Fails when the committed modules differ from what the notebooks export.
check-export: $(STAMP)
	$(PY) -m pytest -q tests/test_export.py

data: $(STAMP)
	$(PY) -c "from sepreformer_book.data import ensure_corpus; print('corpus:', ensure_corpus())"

book: export data
	$(PY) tools/book.py

test: $(STAMP)
	@start=$$(date +%s); \
	SEPREFORMER_PROFILE=ci $(PY) -m pytest -q tests; \
	echo "unit tests: $$(( $$(date +%s) - start )) s"; start=$$(date +%s); \
	SEPREFORMER_PROFILE=ci $(PY) -c "from sepreformer_book.data import ensure_corpus; print('corpus:', ensure_corpus())"; \
	SEPREFORMER_PROFILE=ci $(PY) -m pytest -q --nbval-lax --nbval-current-env chapters/; \
	echo "chapters (ci profile): $$(( $$(date +%s) - start )) s"

RUN ?= book
train: $(STAMP)
	$(PY) -m sepreformer_book.training --out runs/$(RUN) $(if $(RESUME),--resume,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab chapters/

bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done
