"""Open-format answers: the other correct answers stored beside the one reference, read by the
loader, scored as multi-reference BLEU next to the single-reference metrics, and put into MP-GRPO
groups as k off-policy rows; evaluation prompts that do not depend on batch or rank.

    .venv/bin/python -m pytest -q tests/test_references.py
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from grpo_speech.config import UserError, load_config
from grpo_speech.data import DataError, load_split
from grpo_speech.data.rows import RowChecker, all_references, example
from grpo_speech.metrics import evaluate_texts, format_table, multi_reference_bleu


def _write_rows(root, rows):
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for row in rows:
        t = np.arange(8000) / 16000
        sf.write(root / row["audio"], (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    (root / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _load(root, skip_bad=False):
    from grpo_speech.data import load_synthetic
    return load_synthetic(root, "test", "ast", RowChecker(skip_bad, 30.0))


def test_loader_reads_other_correct_answers_and_names_bad_rows(tmp_path):
    rows = [{"id": "a", "audio": "audio/a.flac", "sentence": "I see the dog.",
             "translation": "Ich sehe den Hund.",
             "references": ["Ich sehe den Hund.", "Den Hund sehe ich."]},
            {"id": "b", "audio": "audio/b.flac", "sentence": "Yes.", "translation": "Ja."}]
    _write_rows(tmp_path, rows)
    a, b = _load(tmp_path).examples
    assert a["reference"] == "Ich sehe den Hund." and a["alternatives"] == ["Den Hund sehe ich."]
    assert all_references(a) == ["Ich sehe den Hund.", "Den Hund sehe ich."]
    assert b["alternatives"] == [] and all_references(b) == ["Ja."]  # older files: no list

    for bad, why in ((["Den Hund sehe ich."], "own reference"), ("Ich sehe den Hund.", "list"),
                     ([], "list"), (["Ich sehe den Hund.", 3], "list")):
        _write_rows(tmp_path, [dict(rows[0], references=bad), rows[1]])
        with pytest.raises(DataError, match=rf"test.jsonl line 1: .*{why}"):
            _load(tmp_path)
        assert [e["id"] for e in _load(tmp_path, skip_bad=True).examples] == ["b"]


def test_multi_reference_bleu_credits_any_correct_answer():
    refs = ["gestern hat der mann den hund gesehen", "die katze schläft im garten heute"]
    alts = [["der mann hat gestern den hund gesehen", "der mann sah gestern den hund"], []]
    hyps = ["der mann sah gestern den hund", "die katze schläft im garten heute"]
    single = multi_reference_bleu(hyps, refs, [[], []])
    multi = multi_reference_bleu(hyps, refs, alts)
    assert single < 60 < multi == pytest.approx(100.0)  # the first hypothesis is an alternative
    import sacrebleu
    assert single == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    with pytest.raises(ValueError, match="alternative lists"):
        evaluate_texts(hyps, refs, alternatives=alts[:1])


def test_results_table_shows_multi_reference_bleu_only_when_every_row_has_it():
    row = {"bleu": 10.0, "bertscore": 50.0, "rouge1": 30.0, "rouge2": 10.0, "rougeL": 28.0,
           "meteor": 25.0}
    assert "all refs" not in format_table({"base": row, "grpo": {**row, "bleu_multi": 20.0}})
    table = format_table({"base": {**row, "bleu_multi": 12.0}, "grpo": {**row, "bleu_multi": 20.0}})
    assert table.splitlines()[0].endswith("| BLEU (all refs) |")
    assert table.splitlines()[3].endswith("| 25.00 | 20.00 |")


class _Tok:
    """Enough of a tokenizer for add_reference_samples: one id per character, EOS 1, pad 0."""
    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [2 + ord(c) % 50 for c in text]})()

    def batch_decode(self, ids_BT, skip_special_tokens=True):
        table = {2 + ord(c) % 50: c for c in "abcdefghijklmnopqrstuvwxyz "}
        return ["".join(table[i] for i in row.tolist() if i > 1) for row in ids_BT]


def test_mpgrpo_with_k_off_policy_rows():
    from grpo_speech.rollout import Rollout, add_reference_samples

    G, T = 4, 3
    ids = torch.full((2 * G, T), 7)
    r = Rollout(ids, torch.ones(2 * G, T, dtype=torch.long), torch.full((2 * G, T), -0.5),
                ["sample"] * (2 * G), torch.zeros(2 * G, dtype=torch.bool), None)
    m = add_reference_samples(r, [["ref a", "alt a"], ["ref b"]], _Tok(), group_size=G,
                              max_new_tokens=8)
    assert m.off_policy_B.tolist() == [False, False, True, True, False, False, False, True]
    assert m.texts == ["sample", "sample", "alt a", "ref a", "sample", "sample", "sample", "ref b"]
    assert m.logprobs_BT[2:4].abs().sum() == 0 and m.logprobs_BT[0, :T].tolist() == [-0.5] * T
    assert int(m.mask_BT[3].sum()) == len("ref a") + 1  # with EOS
    assert torch.equal(m.completion_ids_BT[:2, :T], ids[:2])
    with pytest.raises(ValueError, match="1 to G-1"):
        add_reference_samples(r, [["a", "b", "c", "d"], ["e"]], _Tok(), group_size=G, max_new_tokens=8)


def test_off_policy_answers_draw_k_minus_1_alternatives_per_step():
    from grpo_speech.train import off_policy_answers

    cfg = load_config(None, ["method=mpgrpo", "grpo.group_size=4", "grpo.off_policy_rows=3"])
    batch = {"references": ["r0", "r1"], "alternatives": [["a", "b", "c", "d"], ["x"]]}
    draws = [off_policy_answers(batch, cfg, step=s, rank=0) for s in range(8)]
    for d in draws:
        assert d[0][0] == "r0" and len(d[0]) == 3 and len(set(d[0])) == 3
        assert d[1] == ["r1", "x"]  # fewer alternatives than k - 1: all of them
    assert len({tuple(d[0]) for d in draws}) > 1  # drawn afresh each step
    assert off_policy_answers(batch, cfg, step=3, rank=0) == draws[3]  # reproducible
    k1 = load_config(None, ["method=mpgrpo", "grpo.group_size=4"])
    assert off_policy_answers(batch, k1, step=0, rank=0) == [["r0"], ["r1"]]  # the paper's MP-GRPO
    for bad in ("0", "4"):
        with pytest.raises(UserError, match="grpo.off_policy_rows"):
            load_config(None, ["method=mpgrpo", "grpo.group_size=4", f"grpo.off_policy_rows={bad}"])


def test_greedy_evaluation_does_not_depend_on_batching(tmp_path):
    """Prompt wordings are drawn per example, so 1 or 3 examples per batch (as on 3 ranks or 1)
    give the same greedy texts. Before, one generator per batch gave other wordings. (Clips of one
    length: the speech encoder sees zero-padded features of shorter clips in a batch.)"""
    from grpo_speech.evaluate import generate_texts
    from grpo_speech.model import load_model

    cfg = load_config(None, ["task=ast", "eval.temperature=0", "eval.max_new_tokens=12"])
    model, processor = load_model(cfg.model)
    model.eval()
    rng = np.random.default_rng(0)
    examples = []
    for i in range(3):
        path = tmp_path / f"{i}.flac"
        sf.write(path, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        examples.append(example(f"ex{i}", "ast", str(path), 1.0, {}, "Ja."))
    one = generate_texts(model, processor, examples, load_config(None, [
        "task=ast", "eval.temperature=0", "eval.max_new_tokens=12", "eval.batch_size=1"]), seed=0)
    three = generate_texts(model, processor, examples, load_config(None, [
        "task=ast", "eval.temperature=0", "eval.max_new_tokens=12", "eval.batch_size=3"]), seed=0)
    assert one == three
    assert len(set(one)) > 1
