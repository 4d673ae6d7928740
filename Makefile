# Everything a newcomer or CI needs: `make run`, `make test`.
PY ?= python3
# One venv per interpreter version: `.venv` for the default python3, `.venv-3.X` for any
# other (`make test PY=python3.12`), so switching never reuses a venv built for another ABI.
pyver = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
PYVER := $(call pyver,$(PY))
ifeq ($(PYVER),)
$(error PY=$(PY) does not run; pass an installed Python 3.11+ interpreter)
endif
VENV := $(if $(filter $(PYVER),$(call pyver,python3)),.venv,.venv-$(PYVER))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(PYVER)
INTEROP_VENV := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.installed
# The stock SDK we prove wire compatibility with (separate venv: its protos clash with ours).
VIAM_SDK := viam-sdk==0.85.1

.PHONY: venv run test lint type unit proto interop bench bench-compare bench-fleet torture reliability clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	@# A venv left by another interpreter version (python3 upgraded) is rebuilt, not reused.
	@[ ! -e $(VENV) ] || [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$(PYVER)" ] || rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(INTEROP_STAMP):
	$(PY) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet --upgrade pip
	$(INTEROP_VENV)/bin/pip install --quiet '$(VIAM_SDK)'
	touch $(INTEROP_STAMP)

# The demo robot writes capture files into var/capture while the daemon uploads them to
# its embedded ingest server; `.venv/bin/edged status -c config/edged.yaml` shows it move.
run: $(STAMP)
	mkdir -p var/capture var/uploads
	@$(BIN)/python -m edged.daemon.demo var/capture & demo=$$!; \
	trap 'kill $$demo 2>/dev/null' EXIT INT TERM; \
	$(BIN)/edged run -c config/edged.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

type: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not interop"

test: lint type unit

proto: $(STAMP)
	$(BIN)/python protos/generate.py

interop: $(STAMP) $(INTEROP_STAMP)
	EDGED_INTEROP_PYTHON=$(abspath $(INTEROP_VENV))/bin/python $(BIN)/pytest -m interop tests/interop

bench: $(STAMP) $(INTEROP_STAMP)
	$(BIN)/python -m bench

# The stock seed client (viam-sdk, in its own venv) and edged against one acknowledging
# server, in one run: readings/s, CPU per reading, MB/s, peak RSS and ratios.
bench-compare: $(STAMP) $(INTEROP_STAMP)
	$(BIN)/python -m bench compare

# 50 simulated robots into 1 and 2 `edged ingest` replicas on one PostgreSQL + moto S3
# (both started by the bench); QUICK=1 for the under-a-minute version.
bench-fleet: $(STAMP)
	$(BIN)/python -m bench fleet $(if $(QUICK),--quick)

# Reliability suite: `reliability` = quick profile, `torture` = full (200 SIGKILL cycles);
# both rewrite docs/reliability.md with the figures of the run.
reliability: $(STAMP)
	rm -f bench/results/reliability.jsonl
	EDGED_RELIABILITY_OUT=bench/results/reliability.jsonl $(BIN)/pytest tests/reliability -q
	$(BIN)/python -m bench.reliability_report bench/results/reliability.jsonl docs/reliability.md

torture: $(STAMP)
	rm -f bench/results/reliability.jsonl
	EDGED_TORTURE=1 EDGED_RELIABILITY_OUT=bench/results/reliability.jsonl \
		$(BIN)/pytest tests/reliability -q --timeout 3600
	$(BIN)/python -m bench.reliability_report bench/results/reliability.jsonl docs/reliability.md

clean:
	rm -rf .venv .venv-3.* $(INTEROP_VENV) .mypy_cache .ruff_cache .pytest_cache
