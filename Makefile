# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench lint conf clean

install: $(STAMP)

# setup.py builds the C modules in place.
$(STAMP): pyproject.toml setup.py prefork/http/_llhttp.c prefork/http/_nghttp2.c prefork/worker/_combined.c
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	bin/prefork start --foreground -c conf/prefork.toml

# The tests start hundreds of Python processes; where PYTHONDONTWRITEBYTECODE is
# set (as on this machine) each would compile prefork again: compiled once here, they
# import 40% faster (prefork.cli: 367 -> 210 ms; the suite's CPU: 3m32s -> 2m43s).
# pytest rewrites the asserts of the test modules, and of the packages of its
# plugins (hypothesis: about 100 modules), in each of its processes unless it
# may cache them: the suite runs without PYTHONDONTWRITEBYTECODE (a pytest
# process of one small test file: 3.9 s of CPU without the cache, 1.3 s with it).
# worksteal: a test process that runs out of tests takes some of another's queue
# (by default each gets its share up front, and one that finishes early idles):
# alternated on this machine, the same CPU took 100-121 s with the default,
# 81-99 s with worksteal.
test: install
	$(VPY) -m compileall -q prefork tests > /dev/null
	env -u PYTHONDONTWRITEBYTECODE $(VPY) -m pytest -q -n 6 --dist worksteal tests

lint: install
	$(VENV)/bin/ruff check prefork tests
	$(VENV)/bin/mypy prefork/http prefork/config.py

# conf/prefork.toml is generated from the settings table (a unit test checks it).
conf: install
	$(VPY) -c "from prefork.config import render_toml, SHIPPED; print(render_toml(SHIPPED), end='')" > conf/prefork.toml

bench: install
	bash tests/bench/setup.sh
	$(VPY) tests/bench/run.py

clean:
	rm -rf $(VENV) .bench-venv build *.egg-info prefork/*/*.so
