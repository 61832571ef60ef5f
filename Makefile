# difflab: every target creates .venv and installs the project first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.difflab-installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow test-all bench ablate ablate-methods latent-table ttq few-steps gpu-check clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install difflab with the dev extra
	@$(BIN)/python -c "import difflab, torch, lightning; print('difflab', difflab.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__)"

train: $(STAMP)  ## train the default experiment (mnist5k, about 13 min on 2 CPU cores: it plans its epochs to fit); ARGS="key=value ..." to override
	$(BIN)/difflab-train $(ARGS)

test: $(STAMP)  ## the default test suite (7-10 min on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile $(ARGS)

test-slow: $(STAMP)  ## only the slow tests
	$(BIN)/python -m pytest -m slow $(ARGS)

test-all: $(STAMP)  ## every test
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

ablate: $(STAMP)  ## train + evaluate each schedule and objective with one budget (< 45 min on 2 cores); ARGS="only=[linear,cosine] ..."
	$(BIN)/difflab-ablate $(ARGS)

ablate-methods: $(STAMP)  ## the training methods (Min-SNR, rectified flow, EDM, EDM2 weighting) against the default, one budget (~15 min)
	$(BIN)/difflab-ablate --config-name ablate_methods $(ARGS)

bench: $(STAMP)  ## img/s, GFLOP/img and share of the matmul peak for difflab's U-Net and the two peers; gradient checkpointing
	$(BIN)/python benchmarks/bench.py $(ARGS)

latent-table: $(STAMP)  ## pixel vs autoencoder + latent diffusion at the default run's wall time and half of it (about 3.3x the default run: 20-30 min)
	$(BIN)/python benchmarks/latent_vs_pixel.py $(ARGS)

ttq: $(STAMP)  ## time to quality: difflab's default recipe and the two peers, FID against wall time (~50 min)
	$(BIN)/python benchmarks/ttq.py $(ARGS)

few-steps: $(STAMP)  ## consistency tuning (ECT) of the default run: FID at 1 and 2 network calls against DDIM / DPM-Solver++ at 10 (~12 min)
	$(BIN)/python benchmarks/few_steps.py $(ARGS)

gpu-check: $(STAMP)  ## on a machine with a CUDA GPU: precision auto's choice, the default run with trainer=gpu (2-min budget), DDIM-50 FID, make bench there at batch 64 and 1024 (~8 min on an H200)
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

clean-outputs:  ## delete every run under outputs/ (keeps outputs/README.md)
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
