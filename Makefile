# Thin wrappers over the `harness` command. The first target run creates .venv and installs the
# pinned dependencies once (stamp file); later runs reuse them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
PIP := $(PY) -m pip --disable-pip-version-check
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install chromium compare check-quant check-quant-damaged extract bench gpu-test gpu-bench gpu-check gpu-quick zoo zoo-micro test test-fast clean-reports

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# Only the qwen.tiktoken file is used from dashscope: skip its many dependencies.
	$(PIP) install -q --no-deps -c constraints.txt dashscope
	touch $(STAMP)

# Debian's chromium, for the HTML report's browser tests (they skip without it, unless CI is set).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

compare: $(STAMP)
	$(VENV)/bin/harness compare --config configs/default.yaml

# The quantization gate on the embedded family's GPTQ builds (exit 1 on a regression).
check-quant: $(STAMP)
	$(VENV)/bin/harness check --config configs/ci-gate.yaml

# The same gate on deliberately damaged Int4 builds: succeeds only if the gate fails each of them.
check-quant-damaged: $(STAMP)
	for build in tiny-qwen1.5-s-chat-gptq-int2 tiny-qwen1.5-s-chat-gptq-int4-bad-scales; do \
		echo "== gate on $$build as s-chat-gptq-int4"; \
		$(VENV)/bin/harness check --config configs/ci-gate.yaml variants.2.source=zoo:$$build; \
		test $$? -eq 1 || { echo "the gate did not catch $$build"; exit 1; }; \
	done

extract: $(STAMP)
	$(VENV)/bin/harness extract --config configs/default.yaml

# The softmax/filter throughput table + JSON line (also stored in the latest run record, so its
# HTML report shows it), then the pytest-benchmark suite, saved in reports/benchmarks and compared with the last
# run saved there (--benchmark-compare), and as reports/bench.json.
bench: $(STAMP)
	$(VENV)/bin/harness bench $(if $(wildcard reports/latest/run.json),--into reports/latest)
	$(if $(wildcard reports/latest/run.json),,@echo "note: no reports/latest/run.json yet (make compare makes one): the result above is printed, not stored in a run record")
	mkdir -p reports
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-json=reports/bench.json -q \
		--benchmark-autosave --benchmark-storage=reports/benchmarks $(if $(wildcard reports/benchmarks/*/*.json),--benchmark-compare)

# On a CUDA machine whose own python3 holds torch and triton (no .venv, nothing installed). Each part fits one
# device call of at most 10 minutes: gpu-test, the CUDA tests (each setting compiles its kernels, 5-10 s on an H200's
# host; the sm_90 compile tests need no GPU and run with the others); gpu-bench, the launch-settings sweep (SWEEP_SECONDS, in phases:
# the first A/B of every case comes first), then the bench on the GPU at the sweep's best. gpu-check: both.
SWEEP_SECONDS ?= 240
gpu-test:
	PYTHONPATH=$(CURDIR) python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda

gpu-bench:
	mkdir -p reports
	PYTHONPATH=$(CURDIR) python3 -m harness.triton_sweep --seconds $(SWEEP_SECONDS) --json reports/triton-sweep.json
	PYTHONPATH=$(CURDIR) python3 -m harness.bench --device cuda --impls snippet,torch,compiled,triton --batches 1,16,256,4096 \
		--snippet-max-batch 1 --max-gb 100 --triton-settings reports/triton-sweep.json

gpu-check: gpu-test gpu-bench

# All of it in one device call of under 10 minutes, for a session lent 15 minutes of GPU time in all (start included):
# torch's and Triton's CUDA paths against the snippet, a 120 s sweep (its first phase compares each case's ways), then
# the bench of the snippet, torch and Triton at the sweep's best (the defaults where the sweep wrote nothing).
# torch.compile's many compiles are left to gpu-test and gpu-bench. Each part under its own timeout; outputs in GPU_OUT.
GPU_OUT ?= reports
gpu-quick:
	mkdir -p $(GPU_OUT)
	-PYTHONPATH=$(CURDIR) timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_bench.py -k "cuda_matches_snippet and not compiled" 2>&1 \
		| tee $(GPU_OUT)/gpu-test.txt | tail -5
	-PYTHONPATH=$(CURDIR) timeout 190 python3 -m harness.triton_sweep --seconds 120 --json $(GPU_OUT)/triton-sweep.json 2>&1 \
		| tee $(GPU_OUT)/triton-sweep.txt | tail -30
	PYTHONPATH=$(CURDIR) timeout 200 python3 -m harness.bench --device cuda --impls snippet,torch,triton \
		--batches 1,16,256,4096 --snippet-max-batch 1 --max-gb 100 \
		$$(test -s $(GPU_OUT)/triton-sweep.json && echo --triton-settings $(GPU_OUT)/triton-sweep.json) 2>&1 | tee $(GPU_OUT)/gpu-bench.txt

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
