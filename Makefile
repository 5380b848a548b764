# Entry points: `make suite` runs the default sweep, `make test` runs the tests (CI), `make smoke`
# the real-shape dry run in full. All create .venv if missing, install the suite, and make the
# default data available.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
SUITE_ARGS ?= --methods all --ablation all --seeds 5
# the full dry run's protocols and methods (default: every real protocol, every method, every task)
SMOKE_ARGS ?=

.PHONY: suite test smoke venv data clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; skipped when the files are already there.
data:
	@if [ -f $(FMNIST_DEB_DIR)/train-images-idx3-ubyte.gz ] || [ -f data/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else \
		$(BIN)/python -c "import torchvision; torchvision.datasets.FashionMNIST('data', download=True)" && \
		mkdir -p data/fashion-mnist && cp data/FashionMNIST/raw/*.gz data/fashion-mnist/; \
	fi

suite: venv data
	$(BIN)/python run_suite.py $(SUITE_ARGS)

# The tests run in one process per CPU (pytest-xdist), each test file in one process (its
# module fixtures, e.g. test_smoke.py's real-shape dry run, are built once); the test modules
# set one torch thread per process, so the processes do not thrash.
test: venv data
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

# The real-shape dry run in full (hours on a CPU; README "Smoke runs"): first the 2-task form of
# tests/test_smoke.py with every method at the real 224 px (CI runs its reduced form: ViT-B/16 fed
# 32 px), then every method through every task of every real protocol (`run_suite.py smoke`,
# which keeps its smoke records in leaderboard/smoke/).
smoke: venv data
	PROMPTCL_SMOKE=full $(BIN)/python -m pytest -q -p no:xdist tests/test_smoke.py
	$(BIN)/python run_suite.py smoke $(SMOKE_ARGS)

clean:
	rm -rf $(VENV) results
