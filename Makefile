# Two entry points from the README: `make train` and `make test`.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install train test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) PYTHON=$(PYTHON) sh scripts/install.sh
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/hardneg train $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

bench: install
	$(BIN)/python bench/mining.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) runs store
