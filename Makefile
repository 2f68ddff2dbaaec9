# dreamfleet: `make demo` and `make test` work on a fresh clone; each creates the
# virtual environment on first use and installs exactly what requirements.lock says.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dreamfleet-installed
PYTEST_ARGS ?=
# `make test` runs on two processes (pytest-xdist), a module with its fixtures on one, the longest
# modules first (tests/conftest.py): the suite leaves one of the 2 cores idle ~40% of the time
# when it runs alone. `make test TEST_PROCS=` runs it in one process.
TEST_PROCS ?= -n 2 --dist loadscope --no-loadscope-reorder
# The lock: every package, transitive ones included, at one version with its hashes, for
# CPython 3.11 on Linux x86-64 (the CI machine). `make lock` refreshes it.
LOCK   ?= requirements.lock
# Where the CPU build of torch lies: this image ships it in /opt/wheels; elsewhere point this
# at a folder or page holding torch-2.13.0+cpu (e.g. https://download.pytorch.org/whl/cpu/torch/).
TORCH_WHEELS ?= /opt/wheels
UV     := $(BIN)/uv
UV_FLAGS := --python $(BIN)/python --find-links $(TORCH_WHEELS)
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--find-links $(TORCH_WHEELS) -c constraints.txt --no-header --annotation-style line

.PHONY: install demo test test-slow lint format bench clean toy-model toy-flux lock

install: $(STAMP)

# uv itself comes from its own hash-checked lock (pip), then installs the lock into the venv:
# `uv pip sync` makes the environment exactly the lock (extra packages are removed), and the
# package is added editable on top without touching its dependencies.
# --compile-bytecode: uv writes no .pyc by itself, and where PYTHONDONTWRITEBYTECODE is set (CI
# images, this one) Python never caches them either, so every process (each Ray worker, each CLI
# call) compiled torch, diffusers and Ray from source: ~17 s of a 29-s `dreamfleet train` refusal
# and half of a 12-s `ray.init()` on a 2-core machine. Compiling once at install costs ~60 s.
$(STAMP): pyproject.toml $(LOCK) requirements-uv.lock Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements-uv.lock
	$(UV) pip sync -q $(UV_FLAGS) --require-hashes --compile-bytecode $(LOCK)
	$(UV) pip install -q $(UV_FLAGS) --no-deps --no-build-isolation -e .
	@touch $@

# Refresh the lock: resolve again at the newest allowed releases, build a fresh venv from the
# new lock and run the whole suite in it; the new lock replaces the old only if it passes.
lock: $(STAMP)
	$(UV) pip compile $(LOCK_FLAGS) --upgrade pyproject.toml --extra dev lock-tools.in -o $(LOCK).new
	rm -rf .venv-lock
	$(MAKE) test VENV=.venv-lock LOCK=$(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	@echo "requirements.lock refreshed and tested; commit it"

# `make demo BASE=toy-flux` runs it on the toy Flux transformer instead of the toy UNet.
BASE ?= toy
demo: $(STAMP)
	$(BIN)/dreamfleet demo --out demo --base-model $(BASE)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not gpu" $(TEST_PROCS) $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

# Re-pretrain the shipped toy base model (~60 min on 2 CPU cores; see docs/toy_world.md).
toy-model: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/dreamfleet toy pretrain --out platform/dreamfleet/toy/assets/toy-model --minutes 46 --seed 0 --overwrite --grid docs/img/toy_samples.png

# Re-pretrain the shipped toy Flux (~60 min on 1 CPU core; see docs/toy_world.md).
toy-flux: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/dreamfleet toy pretrain --model toy-flux --out platform/dreamfleet/toy/assets/toy-flux --minutes 55 --seed 0 --overwrite --grid docs/img/toy_flux_samples.png

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
