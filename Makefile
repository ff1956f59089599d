# The two commands of the README: `make reproduce` (main job) and `make test`.
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

demo: $(VENV)/.installed
	$(PY) -m gqa_flax.demo

reproduce: demo

.PHONY: install test demo reproduce
