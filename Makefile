# The two README commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates or reuses the virtual environment .venv inside the checkout.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

DEMO_REPO ?= demo-repo

demo: $(STAMP)
	$(VENV)/bin/daskdiff simulate $(DEMO_REPO) --preset demo --overwrite --quiet
	$(VENV)/bin/daskdiff info $(DEMO_REPO)
	$(VENV)/bin/daskdiff run workflows/al.yaml $(DEMO_REPO) --cluster local

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
