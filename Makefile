# lookalike — the commands a person runs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo
ITEMS  ?= 3000
CATALOG = $(DEMO)/catalog/manifest.parquet
LOGS    = $(DEMO)/catalog/interactions.parquet
# The demo's tiny model: small enough to learn colours and patterns in minutes on 2 cores (README "Fine-tuning").
DEMO_MODEL = --image-size 32 --patch-size 4 --width 64 --layers 3 --heads 2
PYTEST_ARGS ?=
# pytest processes: CI's two cores take the suite in ~2/3 of one process's time (BENCHMARKS.md, "The test suite")
TEST_WORKERS ?= 2

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

demo: install  ## the whole story on a generated catalog: fine-tune, nightly twice, query, nDCG@5 (CPU, offline, ~4 min)
	rm -rf $(DEMO)
	@echo "=== 1/8 a synthetic marketplace: $(ITEMS) listings with photos, noisy titles and a click log"
	$(BIN)/lookalike demo-catalog --out $(DEMO)/catalog --items $(ITEMS) --seed 3
	@echo "=== 2/8 a tiny SigLIP with random weights and a tokenizer trained on the titles (offline)"
	$(BIN)/lookalike init-model --catalog $(CATALOG) --out $(DEMO)/untrained $(DEMO_MODEL)
	@echo "=== 3/8 fine-tune both towers on the catalog's image-title pairs with the sigmoid loss (~3 min)"
	$(BIN)/lookalike train --catalog $(CATALOG) --model $(DEMO)/untrained --out $(DEMO)/train \
	  --interactions $(LOGS) --epochs 20 --batch-size 64 --lr 2e-3 --max-text-tokens 16
	@echo "=== 4/8 night 1: embed -> index -> evaluate vs the non-learned pixel baseline -> gate -> publish"
	$(BIN)/lookalike nightly --config examples/demo-nightly.yaml --catalog $(CATALOG) --model $(DEMO)/train/encoder \
	  --out $(DEMO)/out --interactions $(LOGS) --run-id night-1
	@echo "=== 5/8 a day passes: 1% of listings get new photos, a few are delisted"
	$(BIN)/lookalike demo-catalog --out $(DEMO)/catalog --change 0.01
	@echo "=== 6/8 night 2: only the changed photos are encoded again (embedded vs reused), then gated vs night 1"
	$(BIN)/lookalike nightly --config examples/demo-nightly.yaml --catalog $(CATALOG) --model $(DEMO)/train/encoder \
	  --out $(DEMO)/out --interactions $(LOGS) --run-id night-2
	@echo "=== 7/8 a downstream service asks for items like the first listing"
	$(BIN)/lookalike similar $$($(BIN)/python -c "import pyarrow.parquet as pq; print(pq.read_table('$(CATALOG)').column('item_id')[0])") --root $(DEMO)/out/snapshots -k 5
	@echo "=== 8/8 the published fine-tuned model vs the non-learned baseline: nDCG@5 with 95% intervals"
	$(BIN)/lookalike evaluate --snapshot $(DEMO)/out/snapshots --interactions $(LOGS) \
	  --baseline builtin:pixels --catalog $(CATALOG) --out $(DEMO)/eval

test: install browser  ## the test suite CI runs (everything but GPU tests)
	$(BIN)/pytest -m "not gpu" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: install browser  ## every test; GPU tests skip themselves without CUDA
	$(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

bench: install  ## CPU benchmarks: embed, a fresh process's model load, fine-tuning (results go in BENCHMARKS.md)
	$(BIN)/python benchmarks/cpu_embed.py
	$(BIN)/python benchmarks/tower_load.py
	$(BIN)/python benchmarks/version_cache.py
	$(BIN)/python benchmarks/forked_workers.py
	$(BIN)/python benchmarks/forked_workers.py --command nightly
	$(BIN)/python benchmarks/config_check.py
	$(BIN)/python benchmarks/train_bench.py

lint: install  ## ruff lint + format check, hadolint on the Dockerfiles
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint dockerfiles/*.Dockerfile

format: install  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docker:  ## build the Dataflow GPU worker and index-builder images (needs a Docker engine)
	docker build -f dockerfiles/worker-gpu.Dockerfile -t lookalike-worker-gpu .
	docker build -f dockerfiles/index-builder.Dockerfile -t lookalike-index-builder .

clean:  ## remove the virtualenv, demo output and caches
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache *.egg-info
