# `make demo` and `make test` each create .venv if it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch before torchvision before open_clip_torch; pip takes this pair from the local disk here
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dallekit demo

# ruff's rules and the layers contract (import-linter) are in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check dallekit tests benchmarks tools
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q tests

# every test not marked slow: under 3 minutes on 2 cores (docs/DESIGN.md, Contributing)
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/download_vs_img2dataset.py
	$(BIN)/python benchmarks/download_web_sized.py
	$(BIN)/python benchmarks/clean_throughput.py --n 10000
	$(BIN)/python benchmarks/dedup_scale.py
	$(BIN)/python benchmarks/clean_scale.py
	$(BIN)/python benchmarks/clip_filter_overhead.py
	$(BIN)/python benchmarks/adopt_overhead.py
	$(BIN)/python benchmarks/encode_overhead.py
	$(BIN)/python benchmarks/loader_vs_memmap.py
	$(BIN)/python benchmarks/kv_cache.py
	bash benchmarks/setup_dalle_pytorch_venv.sh && .bench/dalle-pytorch/bin/python benchmarks/train_vs_dalle_pytorch.py

clean:
	rm -rf runs .pytest_cache
