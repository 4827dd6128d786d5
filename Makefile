# Two commands for a new user:  `make demo`  and  `make test`.  Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# real HER2ST-format sections, when a copy sits next to the project (as in this team's checkout)
DATA ?= $(wildcard ../shared/data/her2st)

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e . --group test
	touch $@

install: $(VENV)/.installed

demo: install
	MPLBACKEND=agg $(BIN)/st-predict demo $(if $(DATA),--data $(DATA))

test: install
	MPLBACKEND=agg $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_output .pytest_cache
