# Two entry points on a fresh machine: `make repro` (the pipeline) and `make test` (the suite).
# Each creates .venv and installs the project first; the install is skipped while its stamp is
# newer than pyproject.toml and constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REPRO_WORKERS ?= 2   # stages at once (independent ones overlap; 1 = one after another)
PROFILE ?=           # e.g. imdb: profiles/imdb.yaml written over params.yaml first (README, "IMDB profile")

.PHONY: repro profile test bench dvc-repro deps push pull clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Full reproduction: every DVC stage, run by the Prefect flow, mirrored into MLflow.
# With PROFILE=<name>: links the profile's data under inputs/ and writes its params into params.yaml
# (it says so; `git checkout params.yaml` restores the default), then runs the same flow.
repro: $(STAMP) $(if $(strip $(PROFILE)),profile)
	$(BIN)/python -m pipelines.reproduce --workers $(REPRO_WORKERS)

profile: $(STAMP)
	test -n "$(strip $(PROFILE))" || { echo "usage: make profile PROFILE=<name of profiles/*.yaml>"; exit 2; }
	$(BIN)/python -m beyondlm.profiles $(strip $(PROFILE))

# The same stages through DVC alone (no Prefect, no MLflow).
dvc-repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The DVC remote (README "DVC remote"): every output + the run-cache to / from the default remote
# (../beyondlm-dvc-remote unless .dvc/config.local names another, e.g. S3/MinIO).
push: $(STAMP)
	$(BIN)/python -m beyondlm.remote push

pull: $(STAMP)
	$(BIN)/python -m beyondlm.remote pull

# After an import changes: each stage's code deps in dvc.yaml = its import closure (a test checks).
deps: $(STAMP)
	$(BIN)/python -m beyondlm.dvcgraph --write

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean-venv:
	rm -rf $(VENV)
