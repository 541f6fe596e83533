# Two commands do everything on a fresh Debian machine (root, Python 3.11):
#   make quickstart   set up, then run the whole journey end to end
#   make test         set up, then run the test suite (what CI runs)
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/quickstart
APT_PACKAGES := dataset-fashion-mnist chromium

.PHONY: setup system venv quickstart test test-slow models bench clean

setup: system venv

# Debian packages: Fashion-MNIST (the real training set) and chromium (report rendering test).
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev,ray]'
	touch $@

test: setup
	$(BIN)/python -m pytest -n 2 -q

test-slow: setup
	$(BIN)/python -m pytest -n 2 -q --runslow

quickstart: setup
	$(BIN)/python scripts/quickstart.py --out $(OUT)

models: setup
	$(BIN)/python scripts/make_models.py

clean:
	rm -rf $(VENV) runs .pytest_cache
