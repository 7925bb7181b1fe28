# make demo: the Ray evaluation job on the bundled real photos (runs/sample-imagenet/report/).  make test: the test suite.
# Both create .venv and install everything first (torch from the files pip finds on this machine).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[service,test,demo,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/eval_imagenet.py

test: $(STAMP)
	$(BIN)/python -m pytest

# Benchmarks (not part of the test run): each prints its table; docs/performance.md has the latest.
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	cd benchmarks && TQDM_DISABLE=1 ../$(BIN)/python bench_unioncam.py
	cd benchmarks && ../$(BIN)/python bench_precision.py
	cd benchmarks && ../$(BIN)/python bench_metrics_precision.py
	cd benchmarks && ../$(BIN)/python bench_memory.py
	cd benchmarks && ../$(BIN)/python bench_service.py
	cd benchmarks && ../$(BIN)/python bench_report_scale.py
	cd benchmarks && ../$(BIN)/python bench_driver_scale.py
	cd benchmarks && ../$(BIN)/python bench_job_scale.py
	cd benchmarks && ../$(BIN)/python bench_methods.py --size 112
	cd benchmarks && ../$(BIN)/python bench_forward.py
	cd benchmarks && ../$(BIN)/python bench_protocols.py
	cd benchmarks && ../$(BIN)/python bench_road.py
	cd benchmarks && TQDM_DISABLE=1 ../$(BIN)/python bench_sanity.py

lint: $(STAMP)
	$(BIN)/ruff check unioncam tests jobs benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out

# The GPU check (docs/performance.md, "GPU check"). gpu-wheels, here: the wheelhouse gpu-wheels/ (git-ignored, at
# most 60 MiB: Ray slimmed and the packages the GPU machine lacks). gpu-check, on the GPU machine (no network, no
# .venv there): installs it into a temporary folder and runs benchmarks/gpu_check.py.
.PHONY: gpu-wheels gpu-check
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py

gpu-check:
	bash benchmarks/gpu_check.sh
