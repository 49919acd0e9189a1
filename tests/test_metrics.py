"""Evaluation metrics x100 (corpus BLEU, BERTScore, ROUGE-1/2/L, METEOR), the results table and
the `score` command.

    .venv/bin/python -m pytest -q tests/test_metrics.py
"""
import os

import pytest

from grpo_speech.metrics import evaluate_texts, format_table, score_files
from grpo_speech.rewards import bertscore_f1

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def bertscore_loaded():
    # Every evaluate_texts call scores BERTScore: load all-MiniLM-L6-v2 once for this module.
    bertscore_f1(["warm up"], ["warm up"])


def test_identical_corpus():
    texts = ["the cat sat on the mat", "Der Hund läuft über die Straße"]
    scores = evaluate_texts(texts, list(texts))
    assert scores["bleu"] == pytest.approx(100.0, abs=1e-9)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(100.0, abs=1e-9)
    # METEOR of n identical tokens: one chunk, frag 1/n, penalty 0.5/n^3 -> 1 - 1/(2 n^3);
    # n = 6 for both sentences -> 100 * (1 - 1/432).
    assert scores["meteor"] == pytest.approx(100 * (1 - 1 / 432), abs=1e-9)
    assert scores["bertscore"] == pytest.approx(100.0, abs=1e-3)


def test_disjoint_and_empty_hypotheses():
    refs = ["the cat sat on the mat", "ein Hund"]
    for hyps in (["x y z", "q r"], ["", ""]):
        scores = evaluate_texts(hyps, refs)
        for key in ("bleu", "rouge1", "rouge2", "rougeL", "meteor"):
            assert scores[key] == 0.0, (hyps, key)
    assert evaluate_texts(["", ""], refs)["bertscore"] == 0.0


def test_corpus_bleu_and_rouge_hand_checked():
    hyps = ["the cat sat on the mat", "the cat sat on a mat"]
    refs = ["the cat sat on the mat", "the cat sat on the mat"]
    scores = evaluate_texts(hyps, refs)
    # Corpus n-gram counts, sentence 1 (identical) + sentence 2 ("a" for "the"):
    # 1-grams 6+5 of 12, 2-grams 5+3 of 10, 3-grams 4+2 of 8, 4-grams 3+1 of 6; equal lengths.
    assert scores["bleu"] == pytest.approx(100 * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25,
                                           abs=1e-9)
    # Sentence 2: ROUGE-1 5/6 (P = R), ROUGE-2 3/5, LCS 5 -> ROUGE-L 5/6; sentence 1 scores 1.
    assert scores["rouge1"] == pytest.approx(100 * (1 + 5 / 6) / 2, abs=1e-9)
    assert scores["rouge2"] == pytest.approx(100 * (1 + 3 / 5) / 2, abs=1e-9)
    assert scores["rougeL"] == pytest.approx(100 * (1 + 5 / 6) / 2, abs=1e-9)


def test_german_umlauts():
    hyps = ["der Hund läuft über die Straße"]
    refs = ["der Hund rennt über die Straße"]
    scores = evaluate_texts(hyps, refs, lang="de")
    # 1-grams 5/6; 2-grams "der Hund", "über die", "die Straße" 3/5; 3-grams "über die Straße"
    # 1/4; 4-grams 0/3 -> sacrebleu's exp smoothing gives 1/(2*3); product 1/48, BP 1.
    assert scores["bleu"] == pytest.approx(100 * (1 / 48) ** 0.25, abs=1e-9)
    # Unicode tokens ("über", "straße" kept): ROUGE-1 5/6, ROUGE-2 3/5, LCS 5 of 6.
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6, abs=1e-9)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5, abs=1e-9)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6, abs=1e-9)


def test_meteor_documented_example():
    hyp = ("It is a guide to action which ensures that the military always obeys the commands "
           "of the party")
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    # HF evaluate's METEOR docs give 0.6944 for this pair.
    assert evaluate_texts([hyp], [ref])["meteor"] == pytest.approx(69.44, abs=5e-3)


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        evaluate_texts(["a", "b"], ["a"])


def test_format_table():
    row = {"bleu": 12.345, "bertscore": 90.0, "rouge1": 50.0, "rouge2": 25.5,
           "rougeL": 49.999, "meteor": 0.0}
    assert format_table({"grpo": row, "sft": {**row, "bleu": 7.0}}) == (
        "| run | BLEU | BERTScore | ROUGE-1 | ROUGE-2 | ROUGE-L | METEOR |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| grpo | 12.35 | 90.00 | 50.00 | 25.50 | 50.00 | 0.00 |\n"
        "| sft | 7.00 | 90.00 | 50.00 | 25.50 | 50.00 | 0.00 |")
    with pytest.raises(KeyError, match="'sft' lacks meteor"):
        format_table({"sft": {k: v for k, v in row.items() if k != "meteor"}})


def test_score_files(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("der Hund läuft über die Straße\n\n", encoding="utf-8")
    ref.write_text("der Hund rennt über die Straße\nein Haus\n", encoding="utf-8")
    scores = score_files(str(hyp), str(ref), "de")
    # Second hypothesis is empty. Corpus BLEU: as in test_german_umlauts with the reference
    # length 6+2 = 8 against 6 -> BP = exp(1 - 8/6). ROUGE-1 mean (5/6 + 0) / 2.
    assert scores["bleu"] == pytest.approx(100 * (1 / 48) ** 0.25 * 2.718281828459045 ** (-1 / 3),
                                           abs=1e-9)
    assert scores["rouge1"] == pytest.approx(100 * 5 / 12, abs=1e-9)
    out = capsys.readouterr().out
    assert out.startswith("| run | BLEU |") and "| hyp.txt |" in out


def test_score_files_line_count_mismatch(tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("a\nb\nc\n", encoding="utf-8")
    ref.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"hyp\.txt has 3 lines, .*ref\.txt has 2"):
        score_files(str(hyp), str(ref), "en")


def test_score_cli(tmp_path, capsys):
    from grpo_speech.cli import main
    hyp, ref = tmp_path / "h.txt", tmp_path / "r.txt"
    hyp.write_text("Über das Öl ist teuer\n", encoding="utf-8")
    ref.write_text("über das Öl ist teuer\n", encoding="utf-8")
    assert main(["score", "--hyp", str(hyp), "--ref", str(ref), "--lang", "de"]) == 0
    # Only the case of "Über" differs. BLEU is case-sensitive: 1-grams 4/5, 2-grams 3/4,
    # 3-grams 2/3, 4-grams 1/2 -> (1/5)^(1/4) = 66.87; ROUGE lowercases -> 100.
    line = capsys.readouterr().out.splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "h.txt"
    assert float(cells[1]) == pytest.approx(100 * (1 / 5) ** 0.25, abs=5e-3)
    assert cells[3:6] == ["100.00", "100.00", "100.00"]


def test_score_in_chunks_equals_scoring_at_once(tmp_path, capsys, monkeypatch):
    # `score` goes through files in chunks (bounded memory): corpus BLEU from summed statistics
    # and the means of sentence scores come out as evaluate_texts gives them for the whole list.
    import random

    from grpo_speech import metrics
    rng = random.Random(0)
    words = "der die das Hund Katze läuft schnell über Straße Haus ein eine und".split()
    lines = lambda: [" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) for _ in range(25)]  # noqa: E731
    hyps, refs = lines(), [r or "Haus" for r in lines()]
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    whole = evaluate_texts(hyps, refs, lang="de")
    monkeypatch.setattr(metrics, "SCORE_CHUNK", 7)
    chunked = score_files(str(hyp), str(ref), "de", progress=False)
    assert {k: v for k, v in chunked.items() if k != "bertscore"} == pytest.approx(
        {k: whole[k] for k in chunked if k != "bertscore"}, abs=1e-9)
    # BERTScore embeds each chunk as its own float32 batch (other padding): equal to 1e-5.
    assert chunked["bertscore"] == pytest.approx(whole["bertscore"], abs=1e-5)
    # --metrics: only the columns asked for are computed and printed.
    some = score_files(str(hyp), str(ref), "de", ("bleu", "rougeL"), progress=False)
    assert sorted(some) == ["bleu", "rougeL"]
    assert capsys.readouterr().out.splitlines()[-3] == "| run | BLEU | ROUGE-L |"
    with pytest.raises(ValueError, match="--metrics"):
        score_files(str(hyp), str(ref), "de", ("bleu", "chrf"))
