# Two commands: `make demo` and `make test`. Both create .venv when it is missing and install the
# package with the pinned versions in constraints.txt (torch==2.13.0 resolves to the local CPU wheel),
# with the optional extras hf (transformers) and eval (lm-evaluation-harness) that their tests need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean-runs

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,hf,eval]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m slam_pretrain demo

test: $(STAMP)
	bash tests/setup_services.sh
	$(PY) -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py

clean-runs:
	rm -rf runs data
