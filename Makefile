# gfss_hf: `make test` and `make demo` create .venv when missing, install the package with its dev extra, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not fullsize and not browser"

demo: $(STAMP)
	$(PY) scripts/demo.py --output_dir demo_output

lint: $(STAMP)
	$(VENV)/bin/ruff check gfss_hf scripts tests bench spaces
	$(VENV)/bin/ruff format --check gfss_hf scripts tests bench spaces

clean:
	rm -rf demo_output .pytest_cache build *.egg-info
