"""Random streams: every purpose's key (distributed.step_seed) is the formula it has always had,
differs over seeds and steps, and never holds the rank. The evaluation key once did: seed 0 on
rank 1 drew the noise of seed 1 on rank 0.

    .venv/bin/python -m pytest -q tests/test_seeds.py
"""
from __future__ import annotations

import inspect
import itertools

import pytest

from grpo_speech.distributed import SEED_KEYS, step_seed

SEEDS = range(51)
STEPS = range(10_001)
EPOCHS = range(101)
POSITIONS = range(20_001)  # a batch's first row in its split (CoVoST 2's test split: 15,531 rows)
IDS = [f"ast-{i}" for i in range(2_001)]
# Where each purpose is used, as far as a real run goes: one range per part after the seed.
PARTS = {
    "data-order": [EPOCHS],
    "prompt-wording": [STEPS],
    "rollout": [STEPS],
    "off-policy": [STEPS],
    "evaluation": [POSITIONS],
    "evaluation-wording": [IDS],
    "loader": [],
    "pretrain-init": [],
    "pretrain-epoch": [EPOCHS, (False, True)],
    "pretrain-instruct": [],
    "pretrain-instruct-epoch": [("asr", "ast", "sqa"), EPOCHS],
    "pretrain-wording": [STEPS],
    "pretrain-text": [STEPS],
    "pretrain-generate": [range(0, 2_001, 32)],
    "pretrain-text-pairs": [],
    "pretrain-corpus": [],
}


def keys(purpose: str) -> list:
    return [step_seed(seed, purpose, *parts) for seed in SEEDS for parts in itertools.product(*PARTS[purpose])]


def test_every_purpose_is_enumerated():
    assert PARTS.keys() == SEED_KEYS.keys()


def test_keys_by_hand():
    # 3 * 1_000_003 = 3_000_009: step 5's wordings 3_000_014, its sampling noise 3_000_009 + 5 * 97
    # = 3_000_494; the evaluation batch at row 32: 3_000_041. Epoch 2's order: 3 * 7919 + 2 = 23_759.
    assert step_seed(3, "prompt-wording", 5) == 3_000_014
    assert step_seed(3, "rollout", 5) == 3_000_494
    assert step_seed(3, "evaluation", 32) == 3_000_041
    assert step_seed(3, "data-order", 2) == 23_759
    assert step_seed(3, "off-policy", 5) == "off-policy-3-5-0"
    assert step_seed(3, "evaluation-wording", "ast-7") == "prompt-3-ast-7"
    assert step_seed(3, "loader") == 3
    # The pretraining recipe: its committed seed 0 keys a generation batch by its start alone.
    assert step_seed(0, "pretrain-generate", 64) == 64 and step_seed(1, "pretrain-generate", 64) == 1_000_067
    assert step_seed(0, "pretrain-epoch", 4, True) == "pretrain-0-4-True"
    assert step_seed(0, "pretrain-wording", 12) == "0-12"
    assert (step_seed(0, "pretrain-text-pairs"), step_seed(0, "pretrain-corpus")) == (2, 7)


@pytest.mark.parametrize("purpose", sorted(SEED_KEYS))
def test_each_purpose_gives_every_seed_and_step_its_own_stream(purpose):
    got = keys(purpose)
    assert len(set(got)) == len(got)
    if isinstance(got[0], int):  # a CPU torch generator keeps the low 32 bits of its seed
        assert len({k % 2**32 for k in got}) == len(got)


def test_text_keys_of_different_purposes_differ():
    # random.Random hashes a text key whole: distinct texts, distinct streams.
    text = [(p, k) for p in SEED_KEYS for k in keys(p) if isinstance(k, str)]
    assert len({k for _, k in text}) == len(text)


def test_the_old_evaluation_key_shared_noise_between_seeds_and_todays_holds_no_rank():
    old = lambda seed, rank, start: (seed + rank) * 1_000_003 + start  # noqa: E731
    assert old(0, 1, 0) == old(1, 0, 0)  # seed 0 on rank 1 drew what seed 1 drew on rank 0
    # Today a batch is keyed by its place in the split, whichever rank makes it; no key has a rank.
    for purpose, key in SEED_KEYS.items():
        assert "rank" not in inspect.signature(key).parameters, purpose
    assert step_seed(0, "evaluation", 0) != step_seed(1, "evaluation", 0)
