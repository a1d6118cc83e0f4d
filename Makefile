# hbone: `make run` (install + the embedded default), `make test` (install + the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: run test selftest clean

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	touch $@

## run: a complete HBONE tunnel on loopback with development certificates (Ctrl-C stops)
run: $(VENV)/.installed
	$(BIN)/hbone dev --config conf/node.ini

## selftest: the same, one request through the tunnel, then exit
selftest: $(VENV)/.installed
	$(BIN)/hbone dev --config conf/node.ini --selftest

## test: the whole test suite (integration tests need nghttpx, tinyproxy, curl, openssl)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .hbone-state build *.egg-info .pytest_cache .hypothesis

## bench: side-by-side benchmark, raw/socat/stunnel4/nghttpx/hbone (docs/performance.md);
## BENCH_ARGS=--quick for about a minute, BENCH_ARGS=--help for the options
.PHONY: bench
bench: $(VENV)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)
