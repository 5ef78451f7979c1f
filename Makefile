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

# test: every folder (tests/unit, tests/integration, tests/system); test-fast: tests/unit. Both run two
# pytest-xdist workers: most of an integration or system test is waiting (Ray start-ups, health checks,
# subprocesses), and tests/conftest.py gives each worker one torch thread and its own Ray temp dir.
# `--dist loadgroup` keeps the system tests (clusters, subprocesses, the demo) one after another on one worker.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: setup
	$(PY) -m pytest -n 2 tests/unit

demo: setup
	$(VENV)/bin/tokenmill demo --json runs/demo/summary.json

clean:
	rm -rf $(VENV) runs
