"""Clips too short for the feature extractor are refused when the data is loaded, naming the file
and row, instead of crashing the extractor in a batch (possibly in the final test pass).

    .venv/bin/python -m pytest -q tests/test_audio_limits.py
"""
import numpy as np
import pytest
import soundfile as sf
import torch

from grpo_speech.data.audio import MIN_SAMPLES, AudioError, read_audio
from grpo_speech.data.rows import DataError, RowChecker


def _clip(path, n, sr=16000):
    sf.write(path, (np.random.default_rng(0).standard_normal(n) * 0.1).astype("float32"), sr)
    return path


def test_the_minimum_is_the_feature_extractors():
    from transformers import GraniteSpeechProcessor

    from grpo_speech.model import default_base_path
    proc = GraniteSpeechProcessor.from_pretrained(str(default_base_path()))
    proc(["<|audio|> x"], [torch.zeros(MIN_SAMPLES)], return_tensors="pt")  # fits
    with pytest.raises(RuntimeError):
        proc(["<|audio|> x"], [torch.zeros(MIN_SAMPLES - 1)], return_tensors="pt")


def test_a_clip_too_short_is_refused_at_load_with_its_row(tmp_path):
    short = _clip(tmp_path / "short.wav", 600, sr=48000)  # 12.5 ms at 48 kHz: 200 samples at 16 kHz
    with pytest.raises(DataError, match=r"train.tsv line 7: .*short.wav: a clip of 12.5 ms is shorter than"):
        RowChecker(skip_bad=False, max_seconds=30).audio("train.tsv line 7", short)
    checker = RowChecker(skip_bad=True, max_seconds=30)
    assert checker.audio("train.tsv line 7", short) is None
    assert checker.skipped == {"unreadable_audio": 1}
    with pytest.raises(AudioError, match="shorter than the feature extractor"):
        read_audio(short)
    ok = _clip(tmp_path / "ok.wav", MIN_SAMPLES)
    assert RowChecker(skip_bad=False, max_seconds=30).audio("x", ok) == pytest.approx(MIN_SAMPLES / 16000)
