# The book's two commands are `make book` and `make test`; see README.md.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: book test export check-export data lab bench bench-ttq bench-gen venv train

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
	$(PY) -c "from sepreformer_book.choir import ensure_corpus; print('corpus:', ensure_corpus())"

# Executes only chapters whose recorded digest is stale; FORCE=1 re-executes every chapter.
book: export data
	$(PY) tools/book.py $(if $(FORCE),--force,)

test: $(STAMP)
	@start=$$(date +%s); \
	SEPREFORMER_PROFILE=ci $(PY) -m pytest -q tests; \
	echo "unit tests: $$(( $$(date +%s) - start )) s"; start=$$(date +%s); \
	SEPREFORMER_PROFILE=ci $(PY) -c "from sepreformer_book.choir import ensure_corpus; print('corpus:', ensure_corpus())"; \
	SEPREFORMER_PROFILE=ci $(PY) -m pytest -q --nbval-lax --nbval-current-env chapters/; \
	echo "chapters (ci profile): $$(( $$(date +%s) - start )) s"

RUN ?= book
train: $(STAMP)
	$(PY) -m sepreformer_book.training --out runs/$(RUN) $(if $(RESUME),--resume,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab chapters/

# Every benchmark once; time to quality only as a speed probe (its real measurement is `make bench-ttq`).
bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; \
	  if [[ $$script == *time_to_quality* ]]; then $(PY) $$script --speed-only; \
	  elif [[ $$script == *generalisation* ]]; then echo "(training ablation: make bench-gen)"; \
	  elif [[ $$script == *cues* ]]; then echo "(training ablation: see the script's docstring)"; \
	  else $(PY) $$script; fi; done

# About 65 minutes on a 2-core CPU; leave the machine otherwise idle. The speed appendix plots the saved file.
bench-ttq: $(STAMP)
	$(PY) benchmarks/bench_time_to_quality.py --save benchmarks/results/time_to_quality.json

# Trains six variants for 10 minutes each (plus rendering their corpora once): about an hour on a 2-core CPU.
bench-gen: $(STAMP)
	$(PY) benchmarks/bench_generalisation.py --save benchmarks/results/generalisation.json
