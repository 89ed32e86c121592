# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import glt_keras, larq, larq_compute_engine, tensorflow_datasets"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m glt_keras.demo

# pytest exits 5 when it collects no test: that fails here like any other error.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
