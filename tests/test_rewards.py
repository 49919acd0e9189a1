"""Rewards: sentence BLEU, Unicode ROUGE, METEOR with offline WordNet, BERTScore, weighted mixes.

    .venv/bin/python -m pytest -q tests/test_rewards.py            # fast tests
    .venv/bin/python -m pytest -q -m slow tests/test_rewards.py    # BLEU throughput benchmark
"""
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from grpo_speech import rewards
from grpo_speech.rewards import get_reward, meteor, parse_reward_spec, rouge_f, sentence_bleu

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METEOR_HYP = ("It is a guide to action which ensures that the military always obeys the "
              "commands of the party")
METEOR_REF = "It is a guide to action that ensures that the military will forever heed Party commands"


def test_bleu_hand_checked():
    hyps = ["the cat sat on the mat", "a b c d", "the cat", "the cat sat on a mat", ""]
    refs = ["the cat sat on the mat", "e f g h", "the cat sat", "the cat sat on the mat", "x y"]
    # identical -> every precision 1, brevity penalty 1 -> 1.
    # disjoint -> no n-gram matches at all -> 0 (sacrebleu stops early, no smoothing credit).
    # "the cat" vs "the cat sat": p1 = 2/2, p2 = 1/1, effective order 2, BP = exp(1 - 3/2).
    # "... on a mat": p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, product 1/12, BP = 1 -> (1/12)^(1/4).
    # empty hypothesis -> 0.
    expected = [1.0, 0.0, math.exp(-0.5), (1 / 12) ** 0.25, 0.0]
    assert sentence_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)


def test_rouge_hand_checked():
    ref = "the cat sat on the mat"  # 6 unigrams, 5 bigrams
    # "the cat sat": 3 of 3 unigrams match: P 1, R 3/6 -> F 2*0.5/1.5 = 2/3; bigrams 2 of 2 match,
    # R 2/5 -> F 2*0.4/1.4 = 4/7; LCS 3 -> same as ROUGE-1.
    # "mat the cat": unigrams all match -> 2/3; bigram "the cat" 1 of 2, R 1/5 ->
    # F 2*(1/2)(1/5)/(7/10) = 2/7; LCS "the cat" = 2: P 2/3, R 1/3 -> F 4/9.
    hyps = ["the cat sat", "mat the cat"]
    assert rouge_f(hyps, [ref, ref], "rouge1") == pytest.approx([2 / 3, 2 / 3], abs=1e-9)
    assert rouge_f(hyps, [ref, ref], "rouge2") == pytest.approx([4 / 7, 2 / 7], abs=1e-9)
    assert rouge_f(hyps, [ref, ref], "rougeL") == pytest.approx([2 / 3, 4 / 9], abs=1e-9)


def test_rouge_german_umlauts():
    # rouge-score's default tokenizer would give 0 and 1 for the first two pairs.
    hyps = ["Über Öl", "Öl", "Der Hund läuft", ""]
    refs = ["Über Öl", "Äl", "der Hund läuft schnell", "der Hund"]
    # third pair: lowercased, 3 of 3 match, R 3/4 -> F 2*0.75/1.75 = 6/7; empty -> 0.
    assert rouge_f(hyps, refs, "rouge1") == pytest.approx([1.0, 0.0, 6 / 7, 0.0], abs=1e-9)


def test_meteor_documented_example():
    # The example in HF evaluate's METEOR docs (nltk underneath), documented as 0.6944.
    assert meteor([METEOR_HYP], [METEOR_REF]) == pytest.approx([0.6944], abs=5e-5)


def test_meteor_identical_german_and_empty():
    # 3 identical tokens: P = R = 1, one chunk, frag = 1/3, penalty 0.5*(1/3)^3 = 1/54.
    scores = meteor(["Über das Öl", "", "Über das Öl."], ["über das öl", "das Öl", ""])
    assert scores == pytest.approx([1 - 1 / 54, 0.0, 0.0], abs=1e-9)


def _run_python(code: str, env_drop=("NLTK_DATA",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_wordnet_found_without_nltk_data_env():
    # nltk's own default path (sys.prefix/nltk_data) is hidden, so only our fallback can find it.
    code = ("import nltk, sys; nltk.data.path[:] = []; sys.prefix = '/nonexistent';"
            "from grpo_speech.rewards import meteor, load_wordnet;"
            "load_wordnet(); print(round(meteor(['a red car'], ['a red auto'])[0], 4))")
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    # "car"~"auto" share a WordNet synset (nltk matches synonyms of Porter stems, and both are
    # their own stems): 3 matches in 1 chunk -> 1 - 0.5*(1/3)^3 = 1 - 1/54 = 0.9815.
    # Without the synonym stage only "a red" (1 chunk of 2) would match: (2/3)(1 - 0.5/8) = 0.625.
    assert out.stdout.strip() == "0.9815"


def test_meteor_without_wordnet_says_how_to_install():
    code = ("import nltk, sys; nltk.data.path[:] = []; sys.prefix = '/nonexistent';"
            "import grpo_speech.rewards as r; r.__file__ = '/nonexistent/pkg/rewards.py';"
            "r.get_reward('meteor')")
    out = _run_python(code)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "scripts/install_wordnet.sh" in out.stderr
    assert "make install" in out.stderr


def test_mixed_reward_and_forms():
    # "the cat" vs "the cat sat": BLEU exp(-0.5); ROUGE-L LCS 2: P 1, R 2/3 -> F 0.8.
    # identical -> 1 for both; empty -> 0 for both.
    expected = [0.7 * math.exp(-0.5) + 0.3 * 0.8, 1.0, 0.0]
    hyps, refs = ["the cat", "a b", ""], ["the cat sat", "a b", "a b"]
    for spec in ("bleu:0.7,rougeL:0.3", " bleu : 0.7 , rougeL:0.3 ", {"bleu": 0.7, "rougeL": 0.3}):
        rewards_N = get_reward(spec)(hyps, refs)
        assert rewards_N.dtype == torch.float32 and rewards_N.shape == (3,)
        assert rewards_N.tolist() == pytest.approx(expected, abs=1e-6)


def test_single_rewards_in_unit_interval():
    hyps, refs = ["the cat", "a b", "", "Über Öl"], ["the cat sat", "a b", "a b", "Über Öl"]
    for name in ("bleu", "rouge1", "rouge2", "rougeL", "meteor"):
        rewards_N = get_reward(name)(hyps, refs)
        assert rewards_N.shape == (4,)
        assert bool(((rewards_N >= 0) & (rewards_N <= 1)).all()), name
        assert rewards_N[2].item() == 0.0, name


def test_reward_spec_errors():
    assert parse_reward_spec("rougeL") == {"rougeL": 1.0}
    # Weights are kept as given, not normalised.
    assert parse_reward_spec("bleu:2,meteor:1") == {"bleu": 2.0, "meteor": 1.0}
    with pytest.raises(ValueError, match="unknown reward 'blue'.*bleu, rouge1, rouge2, rougeL"):
        get_reward("blue")
    with pytest.raises(ValueError, match="needs a weight"):
        get_reward("bleu,rougeL")
    with pytest.raises(ValueError, match="positive"):
        get_reward("bleu:-1")
    with pytest.raises(ValueError, match="not a number"):
        get_reward("bleu:x")
    with pytest.raises(ValueError, match="empty reward spec"):
        get_reward("")
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        get_reward("bleu")(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def bertscore_reward():
    # Loads all-MiniLM-L6-v2 once (a few seconds); later calls reuse the module-level cache.
    return get_reward("bertscore")


def test_bertscore_identical_and_empty(bertscore_reward):
    hyps = ["the cat sat on the mat", "", "Der Hund läuft schnell", "a dog", "   "]
    refs = ["the cat sat on the mat", "the cat", "Der Hund läuft schnell", "", "x"]
    rewards_N = bertscore_reward(hyps, refs)
    # Identical texts: every token's best match is itself (cosine 1) -> P = R = F1 = 1 up to
    # float32 rounding; any empty side -> 0 (bert-score itself would raise).
    assert rewards_N.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0, 0.0], abs=1e-5)
    assert bertscore_reward(["", ""], ["a", "b"]).tolist() == [0.0, 0.0]


def test_bertscore_model_errors(tmp_path):
    # A wrong model path fails when the reward is built, before any rollout.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_reward("bleu:0.5,bertscore:0.5", bertscore_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="bertscore_layers"):
        rewards.bertscore_f1(["a"], ["a"], model_path=str(tmp_path))


@pytest.mark.slow
def test_bleu_reward_throughput():
    # Target: >= 10,000 pairs/s on one core. CPU time of this process, so a busy machine does
    # not fail it; 10-word sentences as in short answers/translations.
    hyps = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(20000)]
    refs = [f"a fast brown fox leaped over a lazy dog {i}" for i in range(20000)]
    reward = get_reward("bleu")
    reward(hyps[:100], refs[:100])
    start = time.process_time()
    reward(hyps, refs)
    pairs_per_s = len(hyps) / (time.process_time() - start)
    print(f"bleu reward: {pairs_per_s:.0f} pairs/s (CPU time)")
    assert pairs_per_s >= 10_000


def test_bertscore_model_follows_the_target_language():
    # bert_score's own choice per language (bert_score.utils.lang2model, model2layers): German is
    # not scored by an English model.
    from grpo_speech.rewards import MINILM_LAYERS, bertscore_choice
    assert bertscore_choice("auto", 0, "de") == ("bert-base-multilingual-cased", 9)
    assert bertscore_choice("auto", 0, "en") == ("roberta-large", 17)
    assert bertscore_choice("auto", 12, "de") == ("bert-base-multilingual-cased", 12)
    assert bertscore_choice("", 0, "de")[1] == MINILM_LAYERS
