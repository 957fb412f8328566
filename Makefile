# proxyd — developer entry points. `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# `make install`: a system install, staged under DESTDIR when packaging.
PREFIX      ?= /usr/local
DESTDIR     ?=
APPDIR      := $(PREFIX)/lib/proxyd
CONFDIR     ?= /etc/proxyd
UNITDIR     ?= /etc/systemd/system
CREATE_USER ?= yes

.PHONY: dev node-deps install run test lint bench verify-unit clean

# The Node side of the differential tests (tests/node): installed from its lock when npm is
# present; without npm, `make test` still runs and the tests that need node skip (fail in CI).
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
NODE_DEPS  := $(if $(shell command -v npm 2>/dev/null),$(NODE_STAMP))

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## dev: create .venv with proxyd (editable) and its test extras (run/test/lint do it for you)
dev: $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $(NODE_STAMP)

## node-deps: tests/node/node_modules from package-lock.json (make test does it when npm exists)
node-deps: $(NODE_STAMP)

## install: proxyd in its own virtualenv under PREFIX, the systemd unit, the example config
## (never overwriting an existing one) and the `proxyd` system user
install:
	$(PYTHON) -m venv $(DESTDIR)$(APPDIR)
	$(DESTDIR)$(APPDIR)/bin/python -m pip install --quiet .
	@# A venv staged under DESTDIR names DESTDIR in its scripts: point them at the final path.
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlF "$(DESTDIR)" $(DESTDIR)$(APPDIR)/bin $(DESTDIR)$(APPDIR)/pyvenv.cfg \
	    | xargs -r sed -i "s|$(DESTDIR)||g"; fi
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(APPDIR)/bin/proxyd $(DESTDIR)$(PREFIX)/bin/proxyd
	install -d $(DESTDIR)$(UNITDIR)
	sed -e "s|/usr/local/lib/proxyd|$(APPDIR)|g" -e "s|/etc/proxyd|$(CONFDIR)|g" \
	  systemd/proxyd.service > $(DESTDIR)$(UNITDIR)/proxyd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/proxyd.service
	@# Socket activation (port 443 without capabilities): installed, enabled only by hand.
	install -m 0644 systemd/proxyd.socket $(DESTDIR)$(UNITDIR)/proxyd.socket
	install -d -m 0755 $(DESTDIR)$(CONFDIR) $(DESTDIR)$(CONFDIR)/app_auth.d
	@if [ -e $(DESTDIR)$(CONFDIR)/proxyd.toml ]; then \
	  echo "keeping existing $(DESTDIR)$(CONFDIR)/proxyd.toml"; \
	else install -m 0640 etc/proxyd/proxyd.toml $(DESTDIR)$(CONFDIR)/proxyd.toml; fi
	@if [ -z "$(DESTDIR)" ] && [ "$(CREATE_USER)" = yes ] && ! getent passwd proxyd >/dev/null; then \
	  useradd --system --no-create-home --home-dir /var/lib/proxyd \
	    --shell /usr/sbin/nologin proxyd; fi
	@if [ -z "$(DESTDIR)" ] && getent group proxyd >/dev/null; then \
	  chgrp proxyd $(CONFDIR)/proxyd.toml; fi

## run: proxyd with an embedded demo MCP app and dev token issuer (no config needed)
run: $(STAMP)
	$(BIN)/proxyd dev

## test: the whole test suite (PYTEST_ARGS: extra pytest arguments, e.g. the CI hypothesis
## profile: make test PYTEST_ARGS=--hypothesis-profile=ci)
test: $(STAMP) $(NODE_DEPS)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## lint: ruff + mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check proxyd tests bench
	$(BIN)/mypy

## bench: proxyd vs direct vs nginx (installed if missing): ratios, PASS/MISS targets,
## bench/results/latest.json
bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/micro.py

## verify-unit: systemd-analyze verify of the units (the service as `make install` writes it,
## and the socket unit)
verify-unit:
	rm -rf build/unit-root
	$(MAKE) --no-print-directory install PREFIX=$(CURDIR)/build/unit-root/usr \
	  CONFDIR=$(CURDIR)/build/unit-root/etc/proxyd UNITDIR=$(CURDIR)/build/unit-root/systemd \
	  CREATE_USER=no
	systemd-analyze verify build/unit-root/systemd/proxyd.service \
	  build/unit-root/systemd/proxyd.socket

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
