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

# Tests whose answers depend on the CPU's float paths (input encoding, LCE conversion and
# verification, C export): run again on the oneDNN path this machine does not take by default.
# TensorFlow turns oneDNN on by default only on some CPUs (AVX512-VNNI / BF16 / AMX); the main
# pass covers the default path, so both paths are checked on every machine (both reruns when
# the default cannot be read).
CPU_PATH_TESTS := tests/test_layers.py tests/test_convert.py tests/test_sign_ties.py tests/test_mcu.py tests/test_precision.py
# ... but not the QEMU runs: they compare the C library under emulation with its host build,
# which the host tests tie to Keras on both paths; they would only double the time. Nor the
# bfloat16 training step without the planes' sign (a bfloat16 result, checked once).
CPU_PATH_SELECT := "not qemu and not cortex_m4 and not exact_planes_under_bfloat16"

# 1 when TensorFlow takes the oneDNN path here (with TF_ENABLE_ONEDNN_OPTS unset: the CPU decides).
ONEDNN_DEFAULT := from tensorflow.python.util import _pywrap_util_port as p; print(int(p.IsMklEnabled()))

# pytest exits 5 when it collects no test: that fails here like any other error.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider
	@default=$$($(PY) -c "$(ONEDNN_DEFAULT)" 2>/dev/null | tail -n 1); \
	for flag in 0 1; do \
	  if [ "$$flag" != "$$default" ]; then \
	    echo "CPU-path tests again with TF_ENABLE_ONEDNN_OPTS=$$flag (default here: $${default:-unknown})"; \
	    TF_ENABLE_ONEDNN_OPTS=$$flag $(PY) -m pytest $(CPU_PATH_TESTS) -k $(CPU_PATH_SELECT) -q -p no:cacheprovider || exit 1; \
	  fi; \
	done

clean-venv:
	rm -rf $(VENV)
