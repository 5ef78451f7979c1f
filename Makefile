# The two commands a new user needs:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenmill-installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -e ".[test]"
	# lpips is only the reference of tests/unit/test_lpips.py; --no-deps because it requires torchvision,
	# which does not install on CPU-only machines (pyproject cannot say --no-deps).
	$(PY) -m pip install --no-deps "lpips==0.1.4"
	# torch-fidelity is only the reference of tests/unit/test_inception*.py (FID's Inception); --no-deps for the same
	# reason, and into a folder off sys.path (tests/helpers/inception.py adds it): torchmetrics imports any
	# torch-fidelity it can find, and with it the missing torchvision.
	$(PY) -m pip install --no-deps --target $(VENV)/references "torch-fidelity==0.4.0"
	# taming-transformers is only the reference of tests/unit/test_taming_convert.py; --no-deps because it requires
	# torchvision and pytorch-lightning, and the test imports only its torch-only modules (tests/helpers/taming.py).
	$(PY) -m pip install --no-deps "taming-transformers==0.0.1"
	touch $(STAMP)

# test: every folder, cheapest first (tests/unit, tests/integration, tests/system); test-fast: tests/unit.
# test-fast runs two pytest-xdist workers (unit tests start no Ray and no server; tests/conftest.py gives each
# worker one torch thread). The whole suite runs in one process: on two workers a fresh-clone run spent 240 s
# in a multi-node test whose training never reached its fault point (2 cores shared by two Ray sessions and
# a 5-node cluster), and took 965 s in all.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -n 2 tests/unit

demo: setup
	$(VENV)/bin/tokenmill demo --json runs/demo/summary.json

clean:
	rm -rf $(VENV) runs
