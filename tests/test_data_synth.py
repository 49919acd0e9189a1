"""Synthetic spoken datasets: byte-identical reruns, completeness, audio format; a directory
synth did not write (the user's data) is never touched.

    .venv/bin/python -m pytest -q tests/test_data_synth.py
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from grpo_speech.config import load_config
from grpo_speech.data import DataError, load_split
from grpo_speech.data.synth import FORMAT_VERSION, check_synthetic, synthesize, task_texts, text_corpus


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
    assert len(rows) == 6 and set(rows[0]) >= {"id", "audio", "text", "question", "answer",
                                                "references"}
    for row in rows:  # every correct answer, the reference first, a short one among them
        assert row["references"][0] == row["answer"] and len(row["references"]) >= 3
    wave, sr = sf.read(a / rows[0]["audio"])
    info = sf.info(a / rows[0]["audio"])
    assert sr == 16000 and wave.ndim == 1 and info.format == "FLAC"
    assert 0.5 < len(wave) / sr < 8.0
    capsys.readouterr()
    synthesize("sqa", str(a), 6, 2, 3, seed=5)
    assert "nothing to do" in capsys.readouterr().out


def test_one_synthesis_per_directory_at_a_time(tmp_path):
    """A process asking for a dataset that another is writing waits for it (nothing written
    meanwhile), then finds it complete instead of writing the same files over it: parallel runs
    of the experiment grid on a fresh machine synthesize each task's data once."""
    src, out = tmp_path / "src", tmp_path / "ast"
    synthesize("ast", str(src), 3, 1, 1, seed=0)
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a synthesis of `out` in progress
    code = ("import sys; from grpo_speech.data.synth import synthesize; "
            "synthesize('ast', sys.argv[1], 3, 1, 1, seed=0)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert "another process is synthesizing it; waiting" in proc.stdout.readline()
        assert list(out.iterdir()) == []
        shutil.copytree(src, out, dirs_exist_ok=True)  # the other process finishes
    finally:
        os.close(fd)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "nothing to do" in rest, rest
    assert check_synthetic(out, "ast", 3, 1, 1, 0) and digests(out) == digests(src)


def test_incomplete_directory_is_redone(tmp_path):
    out = tmp_path / "d"
    synthesize("ast", str(out), 3, 1, 1, seed=0)
    before = digests(out)
    test_rows = (out / "test.jsonl").read_text()
    # What a run killed before its last write leaves: its marker, no manifest, a torn clip.
    (out / "manifest.json").rename(out / ".synth-incomplete")
    (out / "audio/train/ast-train-000000.flac").write_bytes(b"truncated")
    synthesize("ast", str(out), 3, 1, 1, seed=0)
    assert digests(out) == before  # the marker is gone again
    # The `synth` command may rebuild a directory it wrote with other arguments; the test split
    # does not move when n_train grows.
    synthesize("ast", str(out), 4, 1, 1, seed=0)
    assert (out / "test.jsonl").read_text() == test_rows
    assert json.loads((out / "manifest.json").read_text())["n_train"] == 4
    assert len((out / "train.jsonl").read_text().splitlines()) == 4


def test_users_own_data_is_never_overwritten(tmp_path):
    # A synthetic dataset without its manifest.json, one row of the user's own in train.jsonl:
    # an earlier synth deleted the jsonl files and synthesized over them.
    src = tmp_path / "src"
    synthesize("ast", str(src), 2, 1, 1, seed=0)
    mine = tmp_path / "mine"
    shutil.copytree(src, mine)
    (mine / "manifest.json").unlink()
    own_row = {"id": "my-0", "audio": "audio/train/ast-train-000000.flac", "sentence": "Hi.",
               "translation": "Hallo.", "speaker": "me"}
    (mine / "train.jsonl").write_text(json.dumps(own_row) + "\n")
    before = digests(mine)
    cfg = load_config(None, [f"data.dir={mine}", "data.n_train=2", "data.n_val=1", "data.n_test=1"])
    with pytest.raises(DataError, match=r"mine holds files that `synth` did not write.*data.source"):
        load_split(cfg, "train")
    with pytest.raises(DataError, match="did not write"):
        synthesize("ast", str(mine), 2, 1, 1, seed=0)  # the `synth` command refuses it too
    assert digests(mine) == before
    # A single file of someone else's is enough; an empty directory is fine to fill.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="did not write"):
        synthesize("ast", str(other), 2, 1, 1, seed=0)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_manifest_mismatch_is_an_error_not_a_rebuild(tmp_path):
    out = tmp_path / "d"
    synthesize("ast", str(out), 2, 1, 1, seed=0)
    before = digests(out)
    cfg = load_config(None, [f"data.dir={out}", "data.n_train=3", "data.n_val=1", "data.n_test=1"])
    with pytest.raises(DataError, match=r"n_train=2 .* asks for .*n_train=3 .*data.n_train"):
        load_split(cfg, "train")
    assert digests(out) == before
    # The arguments it was made with read it as it is.
    cfg = load_config(None, [f"data.dir={out}", "data.n_train=2", "data.n_val=1", "data.n_test=1"])
    assert [ex["id"] for ex in load_split(cfg, "train").examples] == ["ast-train-000000",
                                                                        "ast-train-000001"]
    assert digests(out) == before


def test_text_corpus_has_both_languages_and_pretrain_differs():
    texts = text_corpus("ast", 50, seed=0)
    assert len(texts) == 100  # sentence + translation per example
    assert any(" der " in t or t.startswith("Der ") for t in texts)
    pre = text_corpus("sqa", 50, seed=0, domain="pretrain")
    assert len(pre) == 150  # passage, question, answer
    target_names = {"Anna", "Tom", "Maria", "Peter", "Lisa", "Paul", "Emma", "David"}
    assert not target_names & {w.strip(".?,'s") for t in pre for w in t.split()}


def test_rows_list_every_reference():
    for row in task_texts("ast", 100, seed=0):
        refs = row["references"]
        assert refs[0] == row["translation"] and len(set(refs)) == len(refs)
    assert sum(len(row["references"]) > 1 for row in task_texts("ast", 100, seed=0)) > 50
    for task in ("asr", "words"):
        assert all(row["references"] == [row["text"]] for row in task_texts(task, 30, seed=0))


def test_older_format_is_remade(tmp_path):
    out = tmp_path / "d"
    synthesize("ast", str(out), 2, 1, 1, seed=0)
    audio = {k: v for k, v in digests(out).items() if k.startswith("audio/")}
    # What format 1 wrote: the same manifest keys and audio, rows without "references".
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == FORMAT_VERSION == 2
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}, indent=1) + "\n")
    for split in ("train", "validation", "test"):
        path = out / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "references"},
                                           ensure_ascii=False) + "\n" for r in rows))
    assert not check_synthetic(out, "ast", 2, 1, 1, 0)  # synth's own, to be remade: no error
    with pytest.raises(DataError, match="n_train=2 .*version=1.* asks for .*n_train=3"):
        check_synthetic(out, "ast", 3, 1, 1, 0)  # other arguments stay an error
    synthesize("ast", str(out), 2, 1, 1, seed=0)
    assert check_synthetic(out, "ast", 2, 1, 1, 0)
    assert json.loads((out / "manifest.json").read_text())["version"] == 2
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all(r["references"][0] == r["translation"] for r in rows)
    assert {k: v for k, v in digests(out).items() if k.startswith("audio/")} == audio
