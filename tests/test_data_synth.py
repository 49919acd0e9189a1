"""Synthetic spoken datasets: byte-identical reruns, completeness, audio format.

    .venv/bin/python -m pytest -q tests/test_data_synth.py
"""
import hashlib
import json
from pathlib import Path

import soundfile as sf

from grpo_speech.data.synth import synthesize, text_corpus


def digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_skip_when_complete(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize("sqa", str(a), 6, 2, 3, seed=5, workers=2)
    synthesize("sqa", str(b), 6, 2, 3, seed=5, workers=1)
    da = digests(a)
    assert da == digests(b)
    # 11 clips + 3 jsonl + manifest
    assert len(da) == 15
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) >= {"id", "audio", "text", "question", "answer"}
    wave, sr = sf.read(a / rows[0]["audio"])
    info = sf.info(a / rows[0]["audio"])
    assert sr == 16000 and wave.ndim == 1 and info.format == "FLAC"
    assert 0.5 < len(wave) / sr < 8.0
    capsys.readouterr()
    synthesize("sqa", str(a), 6, 2, 3, seed=5)
    assert "nothing to do" in capsys.readouterr().out


def test_incomplete_directory_is_redone(tmp_path):
    out = tmp_path / "d"
    synthesize("ast", str(out), 3, 1, 1, seed=0)
    before = digests(out)
    test_rows = (out / "test.jsonl").read_text()
    (out / "manifest.json").unlink()  # what a run killed before its last write leaves
    (out / "audio/train/ast-train-000000.flac").write_bytes(b"truncated")
    synthesize("ast", str(out), 3, 1, 1, seed=0)
    assert digests(out) == before
    # Other arguments: redone, and the test split does not move when n_train grows.
    synthesize("ast", str(out), 4, 1, 1, seed=0)
    assert (out / "test.jsonl").read_text() == test_rows
    assert json.loads((out / "manifest.json").read_text())["n_train"] == 4
    assert len((out / "train.jsonl").read_text().splitlines()) == 4


def test_text_corpus_has_both_languages_and_pretrain_differs():
    texts = text_corpus("ast", 50, seed=0)
    assert len(texts) == 100  # sentence + translation per example
    assert any(" der " in t or t.startswith("Der ") for t in texts)
    pre = text_corpus("sqa", 50, seed=0, domain="pretrain")
    assert len(pre) == 150  # passage, question, answer
    target_names = {"Anna", "Tom", "Maria", "Peter", "Lisa", "Paul", "Emma", "David"}
    assert not target_names & {w.strip(".?,'s") for t in pre for w in t.split()}
