# dreamfleet: `make demo` and `make test` work on a fresh clone; each creates the
# virtual environment on first use and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dreamfleet-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint format bench clean toy-model

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the constraints file keeps every later step on the CPU build.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/dreamfleet demo --out demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

# Re-pretrain the shipped toy base model (~60 min on 2 CPU cores; see docs/toy_world.md).
toy-model: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/dreamfleet toy pretrain --out platform/dreamfleet/toy/assets/toy-model --minutes 46 --seed 0 --overwrite --grid docs/img/toy_samples.png

bench: $(STAMP)
	$(BIN)/python benchmarks/fanout_overhead.py --subjects 1 8 32 --steps 10
	$(BIN)/python benchmarks/manifest_scale.py --subjects 10000 --images 4 --repeats 7 --builds 3 --shard-size-mb 256
	$(BIN)/python benchmarks/trainer_vs_diffusers.py --model tiny --methods lora full --steps 100 --warmup 5 --repeats 5 --threads 1
	$(BIN)/python benchmarks/serving_bench.py --requests 120 --clients 8

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo runs test-artifacts .pytest_cache .ruff_cache
