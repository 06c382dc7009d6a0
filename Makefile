# Bastion: two entry points, both self-contained on a fresh machine with no cache and no internet
# beyond the package registries.
#   make demo   -> set up, then the main job: `bastion run` on the quick config (report in runs/quick/report/)
#   make test   -> set up, then the gates (ruff, mypy, the import layers) and the test suite
# TORCH_SPEC picks the torch build: the default resolves to the local CPU wheel on our machines
# and to the CUDA build pip chooses on a GPU machine.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.bastion-installed
DATASTAMP  := $(VENV)/.bastion-data

.PHONY: demo test lint test-slow bench setup data clean

demo: data
	$(BIN)/bastion run

test: lint data
	$(BIN)/python -m pytest -q

# the gates: style and likely bugs, types, and the import layers (pyproject.toml configures all three;
# scripts/check_structure.py runs inside the test suite, as tests/test_structure.py)
lint: setup
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/mypy src/bastion
	$(BIN)/lint-imports

test-slow: data
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python bench/attack_overhead.py

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[data,test,ray]"
	# peers used by tests and benchmarks; torchattacks runs without its torchvision requirement
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

data: $(DATASTAMP)

$(DATASTAMP): $(STAMP) scripts/offline_data.sh
	bash scripts/offline_data.sh $(BIN)/python
	touch $(DATASTAMP)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
