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

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# The main job: Table 1 and Figures 3-6, mini preset, on this CPU (resumable; see README).
reproduce: $(VENV)/.installed
	$(PY) -m gqa_flax.reproduce.cli --preset mini --out runs/mini

demo: $(VENV)/.installed
	$(PY) -m gqa_flax.demo

.PHONY: install test demo reproduce
