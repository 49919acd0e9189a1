"""Evaluation metrics, the six columns of the paper's tables (x100): corpus BLEU, BERTScore F1,
ROUGE-1/2/L F and METEOR, plus the markdown table that results.md and `score` print.

    python -m grpo_speech score --hyp hyp.txt --ref ref.txt --lang de
"""
from __future__ import annotations

from pathlib import Path

from grpo_speech.config import UserError
from grpo_speech.rewards import bertscore_f1, meteor, rouge_f

COLUMNS = (("bleu", "BLEU"), ("bertscore", "BERTScore"), ("rouge1", "ROUGE-1"),
           ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR"))


class TextFileError(UserError, ValueError):
    """A hypothesis or reference file that cannot be scored (the CLI prints it in one line)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate_texts(hypotheses: list[str], references: list[str], *, lang: str = "en",
                   bertscore_model: str = "", bertscore_layers: int = 0) -> dict[str, float]:
    """All six metrics x100 over aligned lists. BLEU is sacrebleu's corpus BLEU with its default
    13a tokenizer (the same for English and German); the others are means of sentence scores.

    METEOR's synonym stage uses the English WordNet and its stem stage the Porter stemmer whatever
    `lang` is, as nltk (and HF evaluate, which wraps it) does: for German it mostly counts exact
    matches. `lang` is recorded for that reason and does not change any score.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses")
    from sacrebleu import corpus_bleu
    return {
        "bleu": corpus_bleu(hypotheses, [references]).score,
        "bertscore": 100 * _mean(bertscore_f1(hypotheses, references, bertscore_model,
                                              bertscore_layers)),
        "rouge1": 100 * _mean(rouge_f(hypotheses, references, "rouge1")),
        "rouge2": 100 * _mean(rouge_f(hypotheses, references, "rouge2")),
        "rougeL": 100 * _mean(rouge_f(hypotheses, references, "rougeL")),
        "meteor": 100 * _mean(meteor(hypotheses, references)),
    }


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per model/run name, the six metric columns with 2 decimals."""
    lines = ["| run | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, scores in rows.items():
        missing = [key for key, _ in COLUMNS if key not in scores]
        if missing:
            raise KeyError(f"results row {name!r} lacks {', '.join(missing)}")
        lines.append(f"| {name} | " + " | ".join(f"{scores[key]:.2f}" for key, _ in COLUMNS)
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


def score_files(hyp_path: str, ref_path: str, lang: str = "en") -> dict[str, float]:
    """Scores a hypothesis file against a reference file (UTF-8, one sentence per line, same
    line count), prints the markdown table and returns the metrics dict."""
    hypotheses, references = _read_lines(hyp_path), _read_lines(ref_path)
    if len(hypotheses) != len(references):
        raise TextFileError(f"line counts differ: {hyp_path} has {len(hypotheses)} lines, "
                         f"{ref_path} has {len(references)}")
    if not hypotheses:
        raise TextFileError(f"{hyp_path} and {ref_path} are empty: nothing to score")
    scores = evaluate_texts(hypotheses, references, lang=lang)
    print(format_table({Path(hyp_path).name: scores}))
    return scores
