# The two commands: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SITE   ?= demo-site
PYX    := $(shell find media_core appliance -name '*.pyx' -o -name '*.pxd' 2>/dev/null)
# Debian packages the tests and benchmarks drive as real peers.
DEB_PKGS := sip-tester espeak-ng sox postgresql chromium
DEB_BENCH := kamailio rtpengine

.PHONY: run test test-long bench build sysdeps lint clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=68,<81" "wheel>=0.42" "Cython>=3.0.10,<4" "numpy>=1.26,<3" "grpcio-tools>=1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

$(VENV)/.built: $(VENV)/.installed $(PYX) setup.py proto/bridge.proto proto/build.py
	$(PY) -m proto.build
	$(PY) setup.py -q build_ext --inplace -j 2
	touch $@

build: $(VENV)/.built

# Installs what is missing, as root (CI runs as root); otherwise says what to install.
sysdeps:
	@missing=""; for p in $(DEB_PKGS) $(EXTRA_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "please install as root: apt-get install$$missing"; exit 1; fi; \
	fi

# The whole hybrid on one machine: the appliance, a local cloud and the edge agent enrolled to
# it, and simulated agents taking simulated calls at a gentle rate (edgecc demo --simulate).
run: sysdeps build
	$(VENV)/bin/edgecc demo --site-dir $(SITE) --simulate

test: sysdeps build
	$(PY) -m pytest -q -n 2 --dist loadfile

test-long: sysdeps build
	$(PY) -m pytest -q -m long

bench: build
	$(MAKE) sysdeps EXTRA_DEBS="$(DEB_BENCH)"
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf build $(VENV) media_core/*.so media_core/*.c appliance/**/*.so
