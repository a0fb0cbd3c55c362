# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	bin/prefork start --foreground -c conf/prefork.toml

test: install
	$(VPY) -m pytest -q tests

bench: install
	bash tests/bench/setup.sh
	$(VPY) tests/bench/run.py

clean:
	rm -rf $(VENV) .bench-venv build *.egg-info
