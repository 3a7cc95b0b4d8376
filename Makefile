# Thin wrappers over the `harness` command. The first target run creates .venv and installs the
# pinned dependencies once (stamp file); later runs reuse them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
PIP := $(PY) -m pip --disable-pip-version-check
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install compare extract bench zoo zoo-micro test test-fast clean-reports

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# Only the qwen.tiktoken file is used from dashscope: skip its many dependencies.
	$(PIP) install -q --no-deps -c constraints.txt dashscope
	touch $(STAMP)

compare: $(STAMP)
	$(VENV)/bin/harness compare --config configs/default.yaml

extract: $(STAMP)
	$(VENV)/bin/harness extract --config configs/default.yaml

# The softmax/filter throughput table + JSON line, then the pytest-benchmark suite saved for --benchmark-compare.
bench: $(STAMP)
	$(VENV)/bin/harness bench
	mkdir -p reports
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-json=reports/bench.json -q

zoo: $(STAMP)
	$(VENV)/bin/harness zoo build

zoo-micro: $(STAMP)
	$(VENV)/bin/harness zoo build --profile micro

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

clean-reports:
	find reports -mindepth 1 -not -name .gitkeep -exec rm -rf {} +
