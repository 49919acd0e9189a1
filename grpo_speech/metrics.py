"""Evaluation metrics, the six columns of the paper's tables (x100): corpus BLEU, BERTScore F1,
ROUGE-1/2/L F and METEOR, all against the one reference per example; beside them, when examples
carry other correct answers, multi-reference corpus BLEU; plus the markdown table that
results.md and `score` print.

    python -m grpo_speech score --hyp hyp.txt --ref ref.txt --lang de
"""
from __future__ import annotations

from pathlib import Path

from grpo_speech.config import UserError
from grpo_speech.rewards import bertscore_f1, meteor, rouge_f

COLUMNS = (("bleu", "BLEU"), ("bertscore", "BERTScore"), ("rouge1", "ROUGE-1"),
           ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR"))
MULTI_COLUMN = ("bleu_multi", "BLEU (all refs)")


class TextFileError(UserError, ValueError):
    """A hypothesis or reference file that cannot be scored (the CLI prints it in one line)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def multi_reference_bleu(hypotheses: list[str], references: list[str],
                         alternatives: list[list[str]]) -> float:
    """Corpus BLEU x100 against every correct answer of each example (sacrebleu's multi-reference
    BLEU: n-gram matches clipped by the most in any one reference, the closest reference length
    for the brevity penalty). Examples with fewer answers pad their streams with None."""
    from sacrebleu import corpus_bleu
    rows = [[r] + list(a) for r, a in zip(references, alternatives)]
    width = max(len(r) for r in rows)
    streams = [[r[k] if k < len(r) else None for r in rows] for k in range(width)]
    return corpus_bleu(hypotheses, streams).score


def evaluate_texts(hypotheses: list[str], references: list[str], *, lang: str = "en",
                   bertscore_model: str = "", bertscore_layers: int = 0,
                   alternatives: list[list[str]] | None = None) -> dict[str, float]:
    """All six metrics x100 over aligned lists. BLEU is sacrebleu's corpus BLEU with its default
    13a tokenizer (the same for English and German); the others are means of sentence scores.
    With `alternatives` (the other correct answers of each example, possibly none) it adds
    "bleu_multi", multi-reference BLEU (`multi_reference_bleu`).

    METEOR's synonym stage uses the English WordNet and its stem stage the Porter stemmer whatever
    `lang` is, as nltk (and HF evaluate, which wraps it) does: for German it mostly counts exact
    matches. `lang` chooses BERTScore's model when bertscore_model is "auto" (bert_score's
    choice per language) and changes no other score.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses")
    from sacrebleu import corpus_bleu
    extra = {}
    if alternatives is not None:
        if len(alternatives) != len(references):
            raise ValueError(f"{len(alternatives)} alternative lists but {len(references)} references")
        extra["bleu_multi"] = multi_reference_bleu(hypotheses, references, alternatives)
    return extra | {
        "bleu": corpus_bleu(hypotheses, [references]).score,
        "bertscore": 100 * _mean(bertscore_f1(hypotheses, references, bertscore_model,
                                              bertscore_layers, lang)),
        "rouge1": 100 * _mean(rouge_f(hypotheses, references, "rouge1")),
        "rouge2": 100 * _mean(rouge_f(hypotheses, references, "rouge2")),
        "rougeL": 100 * _mean(rouge_f(hypotheses, references, "rougeL")),
        "meteor": 100 * _mean(meteor(hypotheses, references)),
    }


def bleu_statistics(hypotheses: list[str], references: list[str]):
    """(N, 2 + 8) sacrebleu sufficient statistics per sentence (lengths, n-gram matches and
    totals): corpus BLEU of any subset is `bleu_from_statistics` of the rows' sum."""
    import numpy as np
    from sacrebleu.metrics import BLEU
    return np.asarray(BLEU()._extract_corpus_statistics(hypotheses, [references]), dtype=np.int64)


def bleu_from_statistics(summed) -> float:
    from sacrebleu.metrics import BLEU
    return BLEU()._compute_score_from_stats([int(x) for x in summed]).score


def paired_bootstrap(hyps_a: list[list[str]], hyps_b: list[list[str]], references: list[str], *,
                     n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of test BLEU, system A minus system B (Koehn, 2004), pooled over seeds:
    hyps_a and hyps_b hold one list of hypotheses per seed (any number each), aligned with
    `references`. Each resample draws the test sentences with replacement, scores every seed's
    corpus BLEU on them, and compares the seed means of A and B. Returns the observed difference,
    the 95 % interval of the resampled differences and the share of resamples where A > B."""
    import numpy as np
    stats_a = [bleu_statistics(h, references) for h in hyps_a]
    stats_b = [bleu_statistics(h, references) for h in hyps_b]

    def diff(idx) -> float:
        a = np.mean([bleu_from_statistics(s[idx].sum(0)) for s in stats_a])
        b = np.mean([bleu_from_statistics(s[idx].sum(0)) for s in stats_b])
        return float(a - b)

    rng = np.random.default_rng(seed)
    N = len(references)
    draws = np.array([diff(rng.integers(0, N, N)) for _ in range(n)])
    return {"diff": diff(np.arange(N)), "lo": float(np.percentile(draws, 2.5)),
            "hi": float(np.percentile(draws, 97.5)), "p_a_better": float(np.mean(draws > 0))}


def format_table(rows: dict[str, dict], metrics: tuple[str, ...] | None = None) -> str:
    """Markdown table, one row per model/run name, the six metric columns (or those named in
    `metrics`) with 2 decimals, and multi-reference BLEU last when every row has it."""
    columns = tuple(c for c in COLUMNS if metrics is None or c[0] in metrics)
    columns += (MULTI_COLUMN,) if all(MULTI_COLUMN[0] in r for r in rows.values()) else ()
    lines = ["| run | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, scores in rows.items():
        missing = [key for key, _ in columns if key not in scores]
        if missing:
            raise KeyError(f"results row {name!r} lacks {', '.join(missing)}")
        lines.append(f"| {name} | " + " | ".join(f"{scores[key]:.2f}" for key, _ in columns)
                     + " |")
    return "\n".join(lines)


def _read_lines(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextFileError(f"{path}: not UTF-8 text ({err})") from None
    # One sentence per line; a final newline does not start another (empty) sentence.
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


SCORE_CHUNK = 1000  # lines scored at once by `score`: BERTScore's embeddings stay this small


def score_files(hyp_path: str, ref_path: str, lang: str = "en", metrics: tuple[str, ...] | None = None,
                progress: bool = True) -> dict[str, float]:
    """Scores a hypothesis file against a reference file (UTF-8, one sentence per line, same
    line count), prints the markdown table and returns the metrics dict. `metrics`: the columns
    to compute (default: all six). Lines go through in chunks of SCORE_CHUNK with a progress bar,
    so memory stays bounded whatever the file's length: corpus BLEU is summed from each line's
    sufficient statistics, the other metrics are means of sentence scores."""
    hypotheses, references = _read_lines(hyp_path), _read_lines(ref_path)
    if len(hypotheses) != len(references):
        raise TextFileError(f"line counts differ: {hyp_path} has {len(hypotheses)} lines, "
                         f"{ref_path} has {len(references)}")
    if not hypotheses:
        raise TextFileError(f"{hyp_path} and {ref_path} are empty: nothing to score")
    names = tuple(key for key, _ in COLUMNS) if metrics is None else tuple(metrics)
    unknown = [m for m in names if m not in dict(COLUMNS)]
    if unknown or not names:
        raise TextFileError(f"--metrics {','.join(names)}: expected some of {','.join(k for k, _ in COLUMNS)}")
    import numpy as np
    from tqdm import tqdm

    sums = {m: 0.0 for m in names if m != "bleu"}
    bleu_stats = None
    bar = tqdm(total=len(hypotheses) * len(names), desc="score", unit="line", disable=not progress)
    for i in range(0, len(hypotheses), SCORE_CHUNK):
        h, r = hypotheses[i:i + SCORE_CHUNK], references[i:i + SCORE_CHUNK]
        for name in names:
            if name == "bleu":
                stats = bleu_statistics(h, r).sum(0)
                bleu_stats = stats if bleu_stats is None else bleu_stats + stats
            elif name == "bertscore":
                sums[name] += float(np.sum(bertscore_f1(h, r, lang=lang)))
            elif name == "meteor":
                sums[name] += float(np.sum(meteor(h, r)))
            else:
                sums[name] += float(np.sum(rouge_f(h, r, name)))
            bar.update(len(h))
    bar.close()
    scores = {name: 100 * total / len(hypotheses) for name, total in sums.items()}
    if bleu_stats is not None:
        scores["bleu"] = bleu_from_statistics(bleu_stats)
    scores = {name: scores[name] for name in names}
    print(format_table({Path(hyp_path).name: scores}, names))
    return scores
