"""Pretraining recipe of the tiny base: a few steps on a tiny synthetic set, save, reload.

    .venv/bin/python -m pytest -q tests/test_pretrain.py
"""
import json
import math

from grpo_speech import pretrain
from grpo_speech.config import ModelConfig
from grpo_speech.model import load_model
from grpo_speech.train import lr_lambda


def test_ctc_targets_by_hand():
    # CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'" with blank 0: space 1, a 2, ..., z 27, ' 28.
    # "Hi, Tom's!" -> "hi tom's": h 9, i 10, space 1, t 21, o 16, m 14, ' 28, s 20.
    assert pretrain.ctc_targets("Hi,  Tom's!") == [9, 10, 1, 21, 16, 14, 28, 20]


def test_encoder_frames_by_hand():
    # 1 s = 16000 samples -> 16000 // 160 + 1 = 101 mel frames -> 101 // 2 = 50 encoder frames.
    assert pretrain.encoder_frames(1.0) == 50
    # 2.5 s -> 40000 // 160 + 1 = 251 -> 125.
    assert pretrain.encoder_frames(2.5) == 125


def test_word_errors_by_hand():
    assert pretrain.word_errors("The cat sat.", "the cat sat") == 0
    assert pretrain.word_errors("the cat", "the cat sat") == 1  # one deletion
    assert pretrain.word_errors("a dog sat down", "the cat sat") == 3  # 2 substitutions + 1 insertion


def test_lr_schedule_by_hand():
    # 100 steps, warm-up 0.1 -> 10 warm-up steps: step 0 -> 1/10, step 9 -> 1.0;
    # the cosine reaches 0.1 + 0.9 * 0.5 * (1 + cos(pi * 45 / 90)) = 0.55 half-way through the rest.
    assert math.isclose(lr_lambda(0, 100, 0.1), 0.1)
    assert math.isclose(lr_lambda(9, 100, 0.1), 1.0)
    assert math.isclose(lr_lambda(55, 100, 0.1), 0.55)


def test_tiny_pretraining_run_learns_saves_and_reloads(tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    argv = ["--work-dir", str(work), "--out", str(out), "--n-train", "16", "--n-val", "0",
            "--n-test", "4", "--steps", "12", "--batch-size", "4", "--asr-share", "0",
            "--short-steps", "0", "--save-every", "6", "--eval-n", "0", "--vocab-size", "300",
            "--lm-hidden", "64"]
    report = pretrain.main(argv)
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # At initialisation the answer distribution is close to uniform over the vocabulary:
    # cross-entropy about ln(300) = 5.70. Twelve steps (projector and LM at lr 3e-3) must lower it
    # by more than 0.5 nats (the unigram distribution of the answers alone is worth more than that).
    first, last = rows[0]["loss/ce"], sum(r["loss/ce"] for r in rows[-3:]) / 3
    assert abs(first - math.log(300)) < 1.0, first
    assert last < first - 0.5, (first, last)
    assert all(math.isfinite(r["loss/ctc"]) for r in rows)

    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["command"].endswith(" ".join(argv)) and saved["options"]["steps"] == 12
    assert saved["parameters"] == report["parameters"]
    model, processor = load_model(ModelConfig(path=str(out), train="projector,llm"))
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert model.config.encoder_config.output_dim == len(pretrain.CTC_CHARS) + 1
    assert processor.tokenizer.convert_tokens_to_ids("<|audio|>") == model.config.audio_token_id
