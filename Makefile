# Entry points (see the README): `make study` (the paper's study: HiDisc, HSAT, its
# ablations and the references), `make study-all` (the default study: plus DINO and HLSS) and `make test`.
# Each creates or reuses a local virtual environment in .venv.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hsat-installed
CORES ?= 2
# pip's extra indexes on some machines print one warning per package; keep the log readable.
QUIET_PIP := { grep -v '^WARNING: Location' || true; }

.PHONY: setup study study-all test rehearsal lint bench cost clean-results slurm-check gpu-check

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
	# torchattacks pins an old `requests`; its attacks need only torch, so skip its dependency list.
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import hsat, torch, torchvision, timm, snakemake, torchattacks"
	@touch $@

setup: $(STAMP)

study: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) all --configfile config/core.yaml

# Reuses what `make study` left in results/ and adds the DINO and HLSS families' models.
study-all: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) all

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The tests `make test` leaves out for time (marker `long`): the paper-scale rehearsal of the whole
# DAG under `dvc repro` on a fake OpenSRH (10.6 minutes on 2 shared cores) and gpu_check's CPU path.
rehearsal: $(STAMP)
	$(BIN)/python -m pytest -q -m long

# The study through profiles/slurm on a throwaway one-node SLURM, checked against a local run
# (tests/slurm_check.py: as root it installs Debian's slurm-wlm and munge when missing; exit 77 =
# skipped, with the reason). `make test` runs it too.
slurm-check: $(STAMP)
	$(BIN)/python tests/slurm_check.py

# The paper's rehearsal on a GPU (tests/gpu_check.py, under 8 minutes on one H100): bf16,
# channels_last, torch.compile, a one-process NCCL DDP run, the OOM back-off and the whole DAG of
# a subset on a fake OpenSRH; training and attack images/s per backbone in results/gpu_check.json
# (give them to `hsat plan`). Exit 77 = no GPU here (skipped, with the reason).
gpu-check: $(STAMP)
	$(BIN)/python tests/gpu_check.py --out results/gpu_check.json

lint: $(STAMP)
	$(BIN)/snakemake --lint

bench: $(STAMP)
	$(BIN)/hsat bench --json results/bench.json

# Where the last study's time went (its jobs' benchmarks, by rule and method): results/cost.md.
cost: $(STAMP)
	$(BIN)/hsat report cost --study results/config.resolved.yaml --benchmarks results/benchmarks --cores $(CORES) --out-dir results

clean-results:
	rm -rf results/ .snakemake/
