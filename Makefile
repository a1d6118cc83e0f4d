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

# -- the Long tier of SECURITY §5 (docs/security.md); not part of `make test` --------

SOAK_SECONDS ?= 600
SOAK_RATE ?= 200
FUZZ_SECONDS ?= 60
FUZZ_EXAMPLES ?= 200000

## soak: S51, tunnels opened and closed at SOAK_RATE/s for SOAK_SECONDS (10 min) with a random
## mix of half-close, reset and idle plus 1 % attacks; then FDs, RSS, hashes and logs checked
.PHONY: soak
soak: $(VENV)/.installed-test
	$(BIN)/python -m tests.adversarial.long.soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

## fuzz: S56, atheris (coverage-guided, 1 s per input at most) on every parser, FUZZ_SECONDS each;
## falls back to hypothesis with FUZZ_EXAMPLES inputs each if atheris cannot be installed
.PHONY: fuzz
fuzz: $(VENV)/.installed-test
	$(PIP_INSTALL) atheris || echo "atheris did not install: fuzzing with hypothesis instead"
	$(BIN)/python -m tests.adversarial.long.fuzz --seconds $(FUZZ_SECONDS) --examples $(FUZZ_EXAMPLES) \
		--artifacts fuzz-artifacts

## tlsscan: S57, sslyze (with a client SVID) and openssl s_client against a running hbone listener;
## sslyze gets its own venv, since it pins its own cryptography
.PHONY: tlsscan
tlsscan: $(VENV)/.installed-test
	test -x $(VENV)-tlsscan/bin/sslyze || ($(PYTHON) -m venv $(VENV)-tlsscan && \
		$(VENV)-tlsscan/bin/pip install --quiet --disable-pip-version-check sslyze)
	$(BIN)/python -m tests.adversarial.long.tlsscan --sslyze $(VENV)-tlsscan/bin/sslyze
