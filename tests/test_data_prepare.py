"""`prepare`: the CoVoST 2 join against the official script's pandas code, LibriSQA manifests, and
manifests cached on first use and read back on the next start.

    .venv/bin/python -m pytest -q tests/test_data_prepare.py
"""
import csv
import json

import numpy as np
import pytest
import soundfile as sf

from grpo_speech.cli import main
from grpo_speech.config import load_config
from grpo_speech.data import DataError, load_split
from grpo_speech.data.prompts import run_prompts
from grpo_speech.data.collate import prompt_lengths
from grpo_speech.data.manifest import read_manifest
from grpo_speech.data.prepare import prompt_measure

SR = 48000


def tone(seconds):
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def write_tsv(path, header, rows):
    # The escaping of the CoVoST release (pandas QUOTE_NONE with escapechar "\\").
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def release(tmp_path):
    """Common Voice v4's English folder (validated.tsv, clips/*.mp3 at 48 kHz) and the CoVoST 2
    translation table covost_v2.en_de.tsv (path, translation, split)."""
    cv = tmp_path / "cv-corpus-4-2019-12-10/en"
    (cv / "clips").mkdir(parents=True)
    validated = []
    for i in range(8):
        name = f"common_voice_en_{100 + i}.mp3"
        sf.write(cv / "clips" / name, tone(0.5 + 0.25 * i), SR, format="MP3")
        sentence = 'She said "yes".' if i == 2 else f"Sentence {i}."
        validated.append([f"client{i}", name, sentence, "2", "0", "", "", ""])
    write_tsv(cv / "validated.tsv", ["client_id", "path", "sentence", "up_votes", "down_votes",
                                     "age", "gender", "accent"], validated)
    # Not in the same order as validated.tsv; one path Common Voice v4 does not have; rows 6, 7
    # have no translation. train_covost rows are train in CoVoST 2.
    table = [["common_voice_en_103.mp3", "Satz 3.", "dev"],
             ["common_voice_en_100.mp3", "Satz 0.", "train"],
             ["common_voice_en_999.mp3", "Fehlt.", "train"],
             ["common_voice_en_102.mp3", 'Sie sagte "ja".', "train_covost"],
             ["common_voice_en_101.mp3", "Ein Rück\\strich\tund ein Tab.", "train"],
             ["common_voice_en_104.mp3", "Satz 4.", "test"],
             ["common_voice_en_105.mp3", "Satz 5.", "test"]]
    covost = tmp_path / "covost"
    covost.mkdir()
    write_tsv(covost / "covost_v2.en_de.tsv", ["path", "translation", "split"], table)
    return cv, covost / "covost_v2.en_de.tsv"


def official_split_tsvs(cv_tsv, covost_tsv, out):
    """get_covost_splits.py --version 2 (facebookresearch/covost), its pandas code unchanged."""
    pd = pytest.importorskip("pandas")

    def load_df_from_tsv(path):
        return pd.read_csv(path, sep="\t", header=0, encoding="utf-8", escapechar="\\",
                           quoting=csv.QUOTE_NONE, na_filter=False)

    df = pd.merge(left=load_df_from_tsv(cv_tsv)[["path", "sentence", "client_id"]],
                  right=load_df_from_tsv(covost_tsv)[["path", "translation", "split"]],
                  how="inner", on="path")
    out.mkdir()
    for split in ("train", "dev", "test"):
        cur = df[(df["split"] == split) | (df["split"] == f"{split}_covost")] if split == "train" \
            else df[df["split"] == split]
        cur[["path", "sentence", "translation", "client_id"]].to_csv(
            out / f"covost_v2.en_de.{split}.tsv", sep="\t", header=True, index=False,
            encoding="utf-8", escapechar="\\", quoting=csv.QUOTE_NONE)


def test_prepare_covost2_writes_what_the_official_script_writes(release, tmp_path, capsys):
    cv, table = release
    out = tmp_path / "prepared"
    assert main(["prepare", "covost2", "--cv-dir", str(cv), "--covost-tsv", str(table),
                 "--out", str(out)]) == 0
    official_split_tsvs(cv / "validated.tsv", table, tmp_path / "official")
    for split in ("train", "dev", "test"):
        name = f"covost_v2.en_de.{split}.tsv"
        assert (out / name).read_bytes() == (tmp_path / "official" / name).read_bytes(), name
    # Train: validated.tsv's order, train and train_covost rows, the escaped fields read back.
    header, train = read_manifest(out / "manifest.ast.train.jsonl")
    assert [e["reference"] for e in train.examples] == ["Satz 0.", "Ein Rück\\strich\tund ein Tab.",
                                                         'Sie sagte "ja".']
    assert header["source"] == "covost2" and header["covost_pair"] == "en_de"
    assert [e["seconds"] for e in train.examples] == [0.5, 0.75, 1.0]
    # Counted for the tiny base (projector window 3, 1 embedding each): 0.5 s at 16 kHz = 8000
    # samples -> 51 mel frames -> 25 pairs -> 9 windows -> 9 audio positions; 0.75 s -> 76 -> 38
    # -> 13; 1 s -> 101 -> 50 -> 17. The text part is the same for each row (ast prompts have no
    # fields), so the lengths step with the audio alone: +4 and +8.
    n = [e["prompt_tokens"] for e in train.examples]
    assert [n[1] - n[0], n[2] - n[0]] == [4, 8]
    printed = capsys.readouterr().out
    assert "covost2 ast train: 3 rows, 0.00 hours, longest 1.0 s" in printed
    assert "over data.max_audio_seconds=30: 0 (left out of training)" in printed
    # Training reads the manifest in --out: the same examples as the split TSVs give.
    cfg = load_config(None, ["data.source=covost2", f"data.dir={out}", f"data.audio_root={cv}/clips"])
    examples = load_split(cfg, "train").examples
    assert [e["reference"] for e in examples] == [e["reference"] for e in train.examples]
    assert examples[0]["prompt_tokens"] == n[0]
    # The stored lengths are what measuring gives, and under the same key they are used as stored.
    tokenizer, projector = prompt_measure(cfg)
    prompts = run_prompts(cfg, tokenizer)
    templates = list(prompts.templates)
    fresh = [{k: v for k, v in e.items() if not k.startswith("prompt_tokens")} for e in examples]
    assert prompt_lengths(fresh, templates, tokenizer, prompts.system, projector) == n
    marked = [dict(examples[0], prompt_tokens=10 ** 6)] + examples[1:]
    assert prompt_lengths(marked, templates, tokenizer, prompts.system, projector) == [10 ** 6] + n[1:]
    # Another system turn is another key: the stored lengths are measured again, not trusted.
    assert prompt_lengths(marked, templates, tokenizer, "Be brief.", projector)[0] < 10 ** 6
    assert len(load_split(cfg, "validation").examples) == 1
    assert [e["reference"] for e in load_split(cfg, "test").examples] == ["Satz 4.", "Satz 5."]
    # A manifest of another pair or task is refused by name.
    with pytest.raises(DataError, match=r"manifest.ast.test.jsonl holds .*'covost_pair': 'en_de'"):
        load_split(load_config(None, ["data.source=covost2", f"data.dir={out}",
                                      "data.covost_pair=en_ja"]), "test")


def test_prepare_librisqa(tmp_path, capsys):
    release = tmp_path / "LibriSQA"
    (release / "LibriSQA-PartI").mkdir(parents=True)
    speech = tmp_path / "LibriSpeech/test-clean/1/2"
    speech.mkdir(parents=True)
    rows = []
    for i, seconds in enumerate((1.0, 33.0)):  # test-clean holds clips over 30 s
        sf.write(speech / f"1-2-{i:04d}.flac", np.zeros(int(seconds * 16000), np.float32), 16000)
        rows.append({"speech_path": f"test-clean/1/2/1-2-{i:04d}.flac", "question": f"Q{i}?",
                     "answer": f"A{i}.", "text": f"t{i}", "duration": seconds})
    (release / "LibriSQA-PartI/LibriSQA-PartI-test.json").write_text(json.dumps(rows))
    (release / "LibriSQA-PartI/LibriSQA-PartI-train.json").write_text(json.dumps(rows * 5))
    out = tmp_path / "prepared"
    assert main(["prepare", "librisqa", "--librisqa-dir", str(release), "--librispeech-dir",
                 str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # Both clips stay in test; train (10 rows, 2 held out for validation) keeps its long ones in
    # the manifest and says how many training would leave out.
    assert "librisqa sqa test: 2 rows, 0.01 hours, longest 33.0 s" in printed
    assert "over data.max_audio_seconds=30: 1 (kept: limits cut train only)" in printed
    cfg = load_config(None, ["data.source=librisqa", f"data.dir={out}", "task=sqa"])
    assert [e["reference"] for e in load_split(cfg, "test").examples] == ["A0.", "A1."]
    train = load_split(cfg, "train")
    assert len(train.examples) + train.skipped["too_long"] == 8
    assert all(e["seconds"] == 1.0 for e in train.examples)


def test_manifest_is_cached_on_first_use_and_rebuilt_when_the_source_changes(release, tmp_path):
    cv, table = release
    from grpo_speech.data.prepare import join_covost
    root = tmp_path / "splits"
    join_covost(cv / "validated.tsv", table, root)
    cfg = load_config(None, ["data.source=covost2", f"data.dir={root}",
                             f"data.audio_root={cv}/clips"])
    first = load_split(cfg, "test").examples
    assert len(list((root / ".grpo_speech_cache").glob("covost2-ast-test.*.jsonl"))) == 1
    # The next start reads the cache: it no longer opens the clips (one is gone now).
    (cv / "clips/common_voice_en_105.mp3").unlink()
    assert load_split(cfg, "test").examples == first
    # A changed split file is a new key: built again, and the missing clip is found.
    with open(root / "covost_v2.en_de.test.tsv", "a") as f:
        f.write("common_voice_en_104.mp3\tAgain.\tNochmal.\tclient4\n")
    with pytest.raises(DataError, match=r"test.tsv line 3: .*common_voice_en_105.mp3: audio file "
                                        r"not found"):
        load_split(cfg, "test")


def test_check_prints_the_tables_and_runs_one_step(tmp_path, capsys):
    from grpo_speech.data.synth import synthesize
    root = tmp_path / "ast"
    synthesize("ast", str(root), 4, 2, 2, seed=0)
    assert main(["check", f"data.dir={root}", "data.n_train=4", "data.n_val=2", "data.n_test=2",
                 "grpo.group_size=2", "grpo.max_new_tokens=4", f"run.dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    for split in ("train", "validation", "test"):
        assert f"synthetic ast {split}: " in printed
    assert "check: one grpo step on 2 examples ran: {'loss/total': " in printed
    assert not (tmp_path / "run").exists()  # the step ran in a scratch directory
