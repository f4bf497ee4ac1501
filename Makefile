# Developer entry points. On a fresh machine: `make demo` and `make test` (both create .venv first).
#
#   make venv    create $(VENV) (python3 -m venv) and install torch, the pinned test requirements
#                and this package (editable); a stamp file makes a second run instant
#   make test    run the headless test suite (pytest, per-test timeout)
#   make browser install chromium + chromedriver for the browser tests (root with apt only; else they skip)
#   make demo    run the end-to-end demo into demo-output/
#   make bench   run every bench/*.py
#   make clean   remove generated files (keeps the venv); `make distclean` removes the venv too

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lymphnode-classifier-installed
# torch is installed first and alone: on the project machines this pin takes the local CPU wheel,
# while an unpinned torch (or one pulled in by another package) downloads a multi-GB CUDA build.
TORCH_REQUIREMENT := torch==2.13.0
TEST_TIMEOUT ?= 900
PYTEST_ARGS ?= -q

.PHONY: venv test demo bench clean distclean browser

venv: $(STAMP)

# pyradiomics (a test / bench extra) compiles against numpy without declaring it: numpy and the
# build tools go in first, then the pinned list is installed without build isolation.
$(STAMP): requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_REQUIREMENT)"
	$(PY) -m pip install "$$(grep -E '^numpy==' requirements-test.txt)" setuptools wheel
	$(PY) -m pip install --no-build-isolation -r requirements-test.txt
	$(PY) -m pip install -e .
	touch $@

# The review station's tests (Testing/test_review_station.py) drive Debian's chromium through
# chromedriver. Installed where possible (root and apt-get), else those tests skip saying why;
# instant when both are installed, and never fails `make test`.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for the browser tests"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >/dev/null \
	    || echo "could not install chromium: the browser tests will skip"; \
	else echo "no chromium / chromedriver and not root with apt-get: the browser tests will skip"; fi

test: venv browser
	$(PY) -m pytest Testing $(PYTEST_ARGS) --timeout=$(TEST_TIMEOUT)

demo: venv
	$(PY) -m LymphNodeClassifierLib demo --out demo-output

bench: venv
	@set -e; found=0; for script in bench/*.py; do \
	  [ -f "$$script" ] || continue; found=1; \
	  echo "== $$script"; $(PY) "$$script"; \
	done; [ $$found = 1 ] || echo "no benchmarks in bench/"

clean:
	rm -rf demo-output build .pytest_cache *.egg-info LymphNodeClassifier/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
