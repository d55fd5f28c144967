# The README's two commands: `make demo` and `make test`. Each creates or reuses .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export K_DIFFUSION_USE_COMPILE ?= 0

.PHONY: venv demo test test-fast test-hosts bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kdiff_align.demo

test: $(STAMP)
	$(PY) -m pytest -q

# The fast tier for the edit-test loop (under a minute): the identities, loss equalities and error messages;
# no training runs, subprocesses or benchmarks (markers `slow` and `e2e`, pyproject.toml). `make test` runs all.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e"

# The real-host tier (tests_hosts/, not collected by `make test`): ComfyUI and Forge from ../shared/hosts,
# extracted into $(HOSTS_CACHE)/src, run in a separate venv that layers the hosts' requirements over .venv
# (torch, diffusers and kdiff-align are shared, not reinstalled). Skips, saying why, without the archives.
HOSTS_SRC ?= ../shared/hosts
HOSTS_CACHE ?= .hosts
HOSTS_VENV := $(HOSTS_CACHE)/venv
HOSTS_PY := $(HOSTS_VENV)/bin/python
HOSTS_STAMP := $(HOSTS_VENV)/.installed

$(HOSTS_STAMP): $(STAMP) tests_hosts/requirements.txt tests_hosts/build.py
	$(PY) tests_hosts/build.py --sources $(HOSTS_SRC) --cache $(HOSTS_CACHE) --base-venv $(VENV)
	touch $(HOSTS_STAMP)

test-hosts:
	@if test -d $(HOSTS_SRC); then \
		$(MAKE) --no-print-directory $(HOSTS_STAMP) && \
		$(PY) tests_hosts/build.py --sources $(HOSTS_SRC) --cache $(HOSTS_CACHE) --extract-only && \
		for host in comfyui forge; do \
			KDIFF_ALIGN_HOSTS=$(HOSTS_CACHE)/src $(HOSTS_PY) -m pytest -q -p no:cacheprovider tests_hosts/$$host || exit 1; \
		done; \
	else echo "test-hosts: skipped: $(HOSTS_SRC) (the pinned ComfyUI/Forge sources) is absent"; fi

bench: $(STAMP)
	$(PY) -m kdiff_align.bench speed

clean:
	rm -rf $(VENV) runs $(HOSTS_CACHE)
