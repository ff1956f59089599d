# The two commands of the README: `make reproduce` (the main job) and `make test`.
# Both create .venv and install the pinned versions from constraints.txt first.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,tpu,plot
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

$(VENV)/.installed: setup.py constraints.txt
	python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==25.3"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Test files are spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together,
# so its fixtures are built once), longest files first (tests/conftest.py, which also turns on
# JAX's compilation cache).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole suite (CI); the 15 slowest tests are listed at the end, so a slower suite is seen.
test: $(VENV)/.installed
	$(PYTEST) --durations=15

# While working: every package's tests except the slow ones and the simulated pods (see README).
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow and not pod" --durations=5

# The main job: Table 1 and Figures 3-6, mini preset, on this CPU (resumable; see README).
reproduce: $(VENV)/.installed
	$(VENV)/bin/gqa-reproduce --preset mini --out runs/mini

demo: $(VENV)/.installed
	$(PY) -m gqa_flax.demo

.PHONY: install test test-fast demo reproduce
