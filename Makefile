# lookalike — the commands a person runs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
ITEMS  ?= 500
PYTEST_ARGS ?=

# Everything runs offline: models come from disk, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install browser demo test test-all bench lint format docker clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): setup.py requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)  ## create .venv with the pinned dependencies and lookalike itself

browser:  ## Debian's chromium, which the evaluation report test renders the report in
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the report test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install  ## the whole job end to end on a generated catalog: CPU, offline, local folders
	rm -rf $(DEMO)
	$(BIN)/lookalike demo-catalog --out $(DEMO)/catalog --items $(ITEMS)
	$(BIN)/lookalike init-model --catalog $(DEMO)/catalog/manifest.parquet --out $(DEMO)/model
	$(BIN)/lookalike embed --catalog $(DEMO)/catalog/manifest.parquet --model $(DEMO)/model --out $(DEMO)/out
	@echo "--- the same catalog again: nothing changed, so every vector is reused"
	$(BIN)/lookalike embed --catalog $(DEMO)/catalog/manifest.parquet --model $(DEMO)/model --out $(DEMO)/out
	@echo "--- index the latest run, publish it, and ask for similar items"
	$(BIN)/lookalike index --embeddings $(DEMO)/out --out $(DEMO)/snapshots
	$(BIN)/lookalike publish --root $(DEMO)/snapshots
	$(BIN)/lookalike similar $$($(BIN)/python -c "import pyarrow.parquet as pq; print(pq.read_table('$(DEMO)/catalog/manifest.parquet').column('item_id')[0])") --root $(DEMO)/snapshots -k 5
	@echo "--- offline evaluation against the non-learned pixel baseline (the model is still untrained)"
	$(BIN)/lookalike evaluate --snapshot $(DEMO)/snapshots --interactions $(DEMO)/catalog/interactions.parquet \
	  --baseline builtin:pixels --catalog $(DEMO)/catalog/manifest.parquet --out $(DEMO)/eval

test: install browser  ## the test suite CI runs (everything but GPU tests)
	$(BIN)/pytest -m "not gpu" $(PYTEST_ARGS)

test-all: install browser  ## every test; GPU tests skip themselves without CUDA
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install  ## CPU throughput benchmarks: embed, then fine-tuning (results go in BENCHMARKS.md)
	$(BIN)/python benchmarks/cpu_embed.py
	$(BIN)/python benchmarks/train_bench.py

lint: install  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docker:  ## build the Dataflow GPU worker image (needs a Docker engine)
	docker build -f dockerfiles/worker-gpu.Dockerfile -t lookalike-worker-gpu .

clean:  ## remove the virtualenv, demo output and caches
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache *.egg-info
