# Two commands do everything on a fresh machine: `make bench` and `make test`. Both create .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the environment lacks it, so a CUDA build already visible to the venv is kept.
# On a machine without a GPU, outside this project's CI, a CPU build avoids a multi-GB download:
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install test test-quick lint bench bench-full bench-quick bench-disk gpu-check reference-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Every tier: unit, slow, bench and served (real servers on loopback). CI runs this. Two phases: all but the `timed`
# and `alone` tests in TEST_WORKERS processes of one thread each (they are mostly Python-bound on tiny models; threads
# of two processes on two cores would spin against each other; heavier files first), then those in one process, since
# they assert shares or latencies of wall-clock service, or start a cluster of processes that crawls beside other
# tests. Both phases run; the exit status is the first failure's.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not timed and not alone" -n $(TEST_WORKERS) --dist worksteal --durations=30; a=$$?; \
	$(PY) -m pytest -m "timed or alone" --durations=0; b=$$?; exit $$(( a ? a : b ))

# The edit loop: everything but the slow, bench and served tiers (about a minute here).
test-quick: install
	$(PY) -m pytest -m "not slow and not bench and not served"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) -m lab.offload_bench --mode default --eager-only
	$(PY) -m lab.scale_bench --mode quick
	$(PY) -m lab.fit_bench
	$(PY) -m lab.host_bench --mode quick
	$(PY) -m lab.fairness_bench
	$(PY) -m lab.served_bench
	$(PY) -m lab.gateway_bench --mode quick
	$(PY) -m lab.fleet_bench --scenarios skewed-2 --seconds 6
	$(PY) -m lab.cluster_bench --seconds 30
	$(PY) -m lab.results_doc bench-results docs/results.md

bench-full: install
	$(PY) -m lab.offload_bench --mode full
	$(PY) -m lab.scale_bench --mode full
	$(PY) -m lab.miss_path_bench
	$(PY) -m lab.fit_bench
	$(PY) -m lab.host_bench
	$(PY) -m lab.packed_bench
	$(PY) -m lab.fairness_bench --mode full
	$(PY) -m lab.served_bench --mode full
	$(PY) -m lab.gateway_bench
	$(PY) -m lab.fleet_bench --faults all --growth 100000
	$(PY) -m lab.cluster_bench
	$(PY) -m lab.vllm_bench

bench-quick: install
	$(PY) -m lab.offload_bench --mode quick
	$(PY) -m lab.scale_bench --mode quick
	$(PY) -m lab.fairness_bench --mode quick
	$(PY) -m lab.served_bench --mode quick
	$(PY) -m lab.gateway_bench --mode quick
	$(PY) -m lab.cluster_bench --seconds 20

# A checkpoint larger than RAM streamed from disk under a memory limit (bench-results/disk.json); not in make bench.
bench-disk: install
	$(PY) -m lab.disk_bench
	$(PY) -m lab.disk_bench --mxfp4
	$(PY) -m lab.disk_bench --sizing --gib 27 --limit-gib 9

# On a CUDA machine: a real-link benchmark (bench-results/gpu-check.json), then the CUDA tests; elsewhere it says so.
gpu-check: install
	$(PY) -m lab.gpu_check

reference-model: install
	$(PY) -m lab.train_reference_model --out examples/reference-moe
	$(PY) -m lab.model_card examples/reference-moe
	$(PY) -m lab.train_reference_model --family qwen2_moe --experts 64 --top-k 6 --intermediate 24 \
		--shared-intermediate 96 --layers 6 --steps 1500 --tokenizer examples/reference-moe \
		--experts-impl grouped_mm --out examples/reference-moe-fine
	$(PY) -m lab.model_card examples/reference-moe-fine

clean:
	rm -rf $(VENV) .venv-vllm bench-results .pytest_cache .ruff_cache
