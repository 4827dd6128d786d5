# Two commands for a new user:  `make demo`  and  `make test`.  Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# real HER2ST-format sections, when a copy sits next to the project (as in this team's checkout)
DATA ?= $(wildcard ../shared/data/her2st)

.PHONY: install demo test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e . --group test
	touch $@

install: $(VENV)/.installed

demo: install
	MPLBACKEND=agg $(BIN)/st-predict demo --overwrite $(if $(DATA),--data $(DATA))

# the whole suite on one pytest-xdist worker per core (a test file stays on one worker, so its module fixtures are
# built once; tests/conftest.py gives each worker its share of the cores' threads)
test: install
	MPLBACKEND=agg $(BIN)/python -m pytest -n auto --dist loadfile

# HTML documentation in docs/_build/html (warnings are errors; no network needed)
docs: install
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) demo_output .pytest_cache docs/_build docs/generated docs/tutorials docs/cli.md
