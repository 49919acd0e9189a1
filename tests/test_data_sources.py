"""LibriSQA and CoVoST 2 (TSV and parquet) from tiny fixture files; bad rows; collate, and a clip
whose header reads but whose body does not decode.

    .venv/bin/python -m pytest -q tests/test_data_sources.py
"""
import csv
import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from grpo_speech.config import load_config
from grpo_speech.data import DataError, audio_token_count, collate, load_split, templates_for
from grpo_speech.data.audio import ParquetAudio, read_audio


def tone(seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def cfg_for(source, root, task, **extra):
    over = [f"data.source={source}", f"data.dir={root}", f"task={task}"]
    return load_config(None, over + [f"data.{k}={v}" for k, v in extra.items()])


@pytest.fixture
def librisqa(tmp_path):
    """The release's layout: the root holds LibriSQA-PartI/LibriSQA-PartI-{train,test}.json (a JSON
    array of {speech_path, question, answer, text, duration}) and LibriSQA-PartII/ (multiple
    choice); LibriSpeech flac under LibriSpeech/."""
    root = tmp_path / "librisqa"
    speech = root / "LibriSpeech/train-clean-360/1/2"
    speech.mkdir(parents=True)
    rows = []
    for i in range(10):
        sf.write(speech / f"1-2-{i:04d}.flac", tone(1.0, 16000), 16000)
        # Half the rows carry the LibriSpeech/ prefix, half a .wav suffix for a .flac file.
        path = (f"LibriSpeech/train-clean-360/1/2/1-2-{i:04d}.flac" if i % 2 else
                f"train-clean-360/1/2/1-2-{i:04d}.wav")
        rows.append({"speech_path": path, "question": f"q {i}?", "answer": f"answer {i}.",
                     "text": f"text {i}", "duration": 1.0})
    (root / "LibriSQA-PartI").mkdir()
    (root / "LibriSQA-PartI/LibriSQA-PartI-train.json").write_text(json.dumps(rows))
    (root / "LibriSQA-PartI/LibriSQA-PartI-test.json").write_text(json.dumps(rows[:3]))
    (root / "LibriSQA-PartII").mkdir()
    (root / "LibriSQA-PartII/LibriSQA-PartII-test.json").write_text(json.dumps(
        [{"speech_path": rows[0]["speech_path"], "question_and_option": "Who? A. x B. y C. z D. w",
          "answer": "A", "answer_and_analysis": "A, because."}]))
    return root


def test_librisqa_split_and_path_quirks(librisqa):
    cfg = cfg_for("librisqa", librisqa, "sqa")
    train, val = load_split(cfg, "train"), load_split(cfg, "validation")
    # 20 % of 10 rows held out: 2 validation, 8 train, disjoint, the same on every call.
    assert (len(train.examples), len(val.examples)) == (8, 2)
    assert not {e["id"] for e in train.examples} & {e["id"] for e in val.examples}
    assert [e["id"] for e in val.examples] == [e["id"] for e in load_split(cfg, "validation").examples]
    ex = load_split(cfg, "test").examples[0]
    assert ex["prompt_fields"] == {"question": "q 0?"} and ex["reference"] == "answer 0."
    assert ex["audio"].endswith("1-2-0000.flac") and ex["seconds"] == 1.0


def test_librisqa_root_part_one_folder_json_lines_and_part_two(librisqa):
    # The release's root and its LibriSQA-PartI/ folder give the same rows, and so does JSON lines.
    by_root = load_split(cfg_for("librisqa", librisqa, "sqa"), "test").examples
    folder = librisqa / "LibriSQA-PartI"
    by_folder = load_split(cfg_for("librisqa", folder, "sqa", audio_root=librisqa), "test").examples
    assert [e["reference"] for e in by_root] == ["answer 0.", "answer 1.", "answer 2."]
    assert by_folder == by_root
    test_json = folder / "LibriSQA-PartI-test.json"
    test_json.write_text("".join(json.dumps(r) + "\n" for r in json.loads(test_json.read_text())))
    assert load_split(cfg_for("librisqa", librisqa, "sqa"), "test").examples == by_root
    with pytest.raises(DataError, match=r"LibriSQA-PartII is LibriSQA Part II \(multiple choice"):
        load_split(cfg_for("librisqa", librisqa / "LibriSQA-PartII", "sqa"), "test")


def test_librisqa_bad_rows(librisqa):
    test_json = librisqa / "LibriSQA-PartI/LibriSQA-PartI-test.json"
    rows = json.loads(test_json.read_text())
    rows[1]["answer"] = "  "
    rows[2]["speech_path"] = "train-clean-360/1/2/missing.flac"
    test_json.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"PartI-test.json row 1: empty field 'answer'"):
        load_split(cfg_for("librisqa", librisqa, "sqa"), "test")
    split = load_split(cfg_for("librisqa", librisqa, "sqa", skip_bad="true"), "test")
    assert len(split.examples) == 1
    assert split.skipped == {"empty_text": 1, "missing_audio": 1}


def write_covost_tsv(path, rows):
    """A split TSV exactly as get_covost_splits.py writes it: pandas `to_csv(sep="\t",
    index=False, quoting=csv.QUOTE_NONE, escapechar="\\")`, which writes through the csv module
    with these arguments (the bytes are the same; test_prepare_covost2 checks it against pandas)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\",
                            lineterminator="\n")
        writer.writerow(["path", "sentence", "translation", "client_id"])
        writer.writerows(rows)


@pytest.fixture
def covost_tsv(tmp_path):
    root = tmp_path / "covost"
    (root / "clips").mkdir(parents=True)
    # Common Voice style: MP3 at 48 kHz, stereo to check the down-mix.
    sf.write(root / "clips/a.mp3", tone(1.0, 48000, channels=2), 48000, format="MP3")
    sf.write(root / "clips/b.mp3", tone(2.0, 48000), 48000, format="MP3")
    (root / "clips/corrupt.mp3").write_bytes(b"this is not audio" * 20)
    sf.write(root / "clips/long.mp3", tone(3.0, 48000), 48000, format="MP3")
    write_covost_tsv(root / "covost_v2.en_de.dev.tsv", [
        ["a.mp3", 'He said "hello".', 'Er sagte "hallo".', "c1"],  # written as \"hallo\"
        ["b.mp3", "Good morning.", "Guten Morgen.", "c2"],
        ["corrupt.mp3", "Broken.", "Kaputt.", "c3"],
        ["long.mp3", "Long.", "Lang.", "c4"],
        ["b.mp3", "No translation.", "", "c5"]])
    with open(root / "covost_v2.en_de.dev.tsv", "a") as f:
        f.write("b.mp3\ttoo few fields\n")
    return root


def test_covost_tsv(covost_tsv):
    with pytest.raises(DataError, match=r"dev.tsv line 4: .*corrupt.mp3: unreadable audio"):
        load_split(cfg_for("covost2", covost_tsv, "ast"), "validation")
    split = load_split(cfg_for("covost2", covost_tsv, "ast", skip_bad="true",
                               max_audio_seconds=2.5), "validation")
    # max_audio_seconds is a training limit: the 3 s clip stays in validation.
    assert [e["reference"] for e in split.examples] == ['Er sagte "hallo".', "Guten Morgen.", "Lang."]
    assert split.skipped == {"unreadable_audio": 1, "empty_text": 1, "malformed_row": 1}
    wave = read_audio(split.examples[0]["audio"])
    # 1 s at 48 kHz -> 16000 samples at 16 kHz; the MP3 decoder may pad a frame (1152 samples at
    # 48 kHz = 384 at 16 kHz) at either end.
    assert wave.ndim == 1 and wave.dtype == np.float32 and 16000 <= len(wave) <= 16000 + 2 * 384
    asr = load_split(cfg_for("covost2", covost_tsv, "asr", skip_bad="true"), "validation")
    assert asr.examples[1]["reference"] == "Good morning."


def test_covost_tsv_escaping_of_the_release(tmp_path):
    # Quotes, backslashes, a tab and a line break inside fields, as pandas escapes them; the
    # Common Voice folder beside the CoVoST one (data.audio_root), as the release has it.
    clips = tmp_path / "cv-corpus-4-2019-12-10/en/clips"
    clips.mkdir(parents=True)
    for name in ("a", "b", "c"):
        sf.write(clips / f"common_voice_en_{name}.mp3", tone(0.5, 48000), 48000, format="MP3")
    root = tmp_path / "covost"
    root.mkdir()
    texts = [('He said "hello".', 'Er sagte "hallo".'),
             ("A back\\slash and a\ttab.", "Ein Rück\\strich und ein\tTab."),
             ("Two\nlines.", "Zwei\nZeilen.")]
    write_covost_tsv(root / "covost_v2.en_de.test.tsv",
                     [[f"common_voice_en_{n}.mp3", en, de, "c"] for n, (en, de) in zip("abc", texts)])
    raw = (root / "covost_v2.en_de.test.tsv").read_text()
    assert '\\"hallo\\"' in raw and "Rück\\\\strich" in raw and "ein\\\tTab" in raw
    # Common Voice's own dev.tsv/test.tsv lie in the same folders and are not CoVoST files.
    (clips.parent / "test.tsv").write_text("client_id\tpath\tsentence\nx\ty\tz\n")
    cfg = cfg_for("covost2", root, "ast", audio_root=clips)
    examples = load_split(cfg, "test").examples
    assert [e["reference"] for e in examples] == [de for _, de in texts]
    assert [e["reference"] for e in load_split(cfg_for("covost2", root, "asr", audio_root=clips),
                                              "test").examples] == [en for en, _ in texts]
    # Rows are named by the file line they start on (the third spans lines 4 to 6).
    assert [e["where"].rsplit(" ", 1)[1] for e in examples] == ["2", "3", "4"]


def covost_parquet(path, n, *, seconds=0.5, row_group_size=None, prefix=""):
    """A hub parquet file (fixie-ai/covost2 columns) of n rows of encoded FLAC."""
    def encoded(i):
        buf = io.BytesIO()
        sf.write(buf, tone(seconds + 0.25 * i, 16000), 16000, format="FLAC")
        return buf.getvalue()

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "client_id": [f"c{i}" for i in range(n)],
        "file": [f"clips/{prefix}{i}.mp3" for i in range(n)],
        "audio": [{"bytes": encoded(i), "path": f"{prefix}{i}.mp3"} for i in range(n)],
        "sentence": [f"{prefix}Sentence {i}." for i in range(n)],
        "translation": [f"{prefix}Satz {i}." for i in range(n)],
        "id": [f"{prefix}{i}" for i in range(n)],
    })
    pq.write_table(table, path, row_group_size=row_group_size)


def test_covost_parquet(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()

    def encoded(seconds, fmt):
        buf = io.BytesIO()
        sf.write(buf, tone(seconds, 16000), 16000, format=fmt)
        return buf.getvalue()

    table = pa.table({
        "audio": [{"bytes": encoded(1.0, "FLAC"), "path": "x.flac"},
                  {"bytes": b"garbage" * 10, "path": "bad.wav"},
                  {"bytes": encoded(0.5, "WAV"), "path": "y.wav"}],
        "sentence": ["One.", "Two.", "Three."],
        "translation": ["Eins.", "Zwei.", "Drei."],
        "id": ["r0", "r1", "r2"],
    })
    pq.write_table(table, root / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 1 .*bad.wav"):
        load_split(cfg_for("covost2", root, "ast"), "test")
    split = load_split(cfg_for("covost2", root, "ast", skip_bad="true"), "test")
    assert [e["id"] for e in split.examples] == ["covost2-test-r0", "covost2-test-r2"]
    assert split.skipped == {"unreadable_audio": 1}
    assert len(read_audio(split.examples[1]["audio"])) == 8000


def test_covost_parquet_layouts_pairs_and_lazy_audio(tmp_path):
    root = tmp_path / "covost2"
    # The main layout for en_de, the auto-converted one for validation, and another pair beside.
    covost_parquet(root / "en_de/test-00000-of-00002.parquet", 5, row_group_size=2)
    covost_parquet(root / "en_de/test-00001-of-00002.parquet", 2, prefix="s")
    covost_parquet(root / "en_de/validation/0000.parquet", 3)
    covost_parquet(root / "de_en/test-00000-of-00001.parquet", 4, prefix="de")
    test = load_split(cfg_for("covost2", root, "ast"), "test").examples
    assert [e["reference"] for e in test] == [f"Satz {i}." for i in range(5)] + ["sSatz 0.", "sSatz 1."]
    assert len(load_split(cfg_for("covost2", root, "ast"), "validation").examples) == 3
    # The example holds (file, row), not the bytes; a row is read from its row group on demand:
    # row 3 is the second row of the second row group (groups of 2 rows), a 0.5 + 0.75 s tone.
    ex = test[3]
    assert ex["audio"] == ParquetAudio(str(root / "en_de/test-00000-of-00002.parquet"), 3)
    # 16-bit FLAC: the tone comes back to within one quantisation step (2^-15).
    assert ex["seconds"] == 1.25
    assert np.abs(read_audio(ex["audio"]) - tone(1.25, 16000)).max() <= 2 ** -15
    de_en = load_split(cfg_for("covost2", root, "ast", covost_pair="de_en"), "test").examples
    assert [e["reference"] for e in de_en] == [f"deSatz {i}." for i in range(4)]
    with pytest.raises(DataError, match=r"no CoVoST 2 files of data.covost_pair='fr_en'; found "
                                        r"the pairs \['de_en', 'en_de'\]"):
        load_split(cfg_for("covost2", root, "ast", covost_pair="fr_en"), "test")
    # A pair folder given as data.dir is that pair.
    assert len(load_split(cfg_for("covost2", root / "en_de", "ast"), "test").examples) == 7
    # The other hub layout of the same split beside it would give every row twice: refused.
    covost_parquet(root / "en_de/test/0000.parquet", 7)
    with pytest.raises(DataError, match=r"CoVoST 2 en_de test is there more than once"):
        load_split(cfg_for("covost2", root, "ast"), "test")


def test_covost_join_table_alone_names_the_prepare_step(tmp_path):
    root = tmp_path / "covost"
    root.mkdir()
    (root / "covost_v2.en_de.tsv").write_text("path\ttranslation\tsplit\nx.mp3\tx\ttrain\n")
    with pytest.raises(DataError, match=r"no CoVoST 2 en_de train file .*covost_v2.en_de.tsv is the "
                                        r"translation table before the join: run `python -m "
                                        r"grpo_speech prepare covost2`"):
        load_split(cfg_for("covost2", root, "ast"), "train")


def test_length_limit_cuts_train_only(librisqa):
    # 1 s clips and a 0.5 s limit: train loses every row (counted), test keeps all three.
    cfg = cfg_for("librisqa", librisqa, "sqa", max_audio_seconds=0.5)
    train = load_split(cfg, "train")
    assert train.examples == [] and train.skipped == {"too_long": 8}
    assert len(load_split(cfg, "test").examples) == 3
    assert len(load_split(cfg, "validation").examples) == 2


def tiny_processor():
    from transformers import GraniteSpeechFeatureExtractor, GraniteSpeechProcessor
    from grpo_speech.model import build_tokenizer
    from grpo_speech.data.synth import text_corpus
    tok = build_tokenizer(text_corpus("sqa", 100, 0) + text_corpus("ast", 100, 0), 500)
    return GraniteSpeechProcessor(GraniteSpeechFeatureExtractor(), tok)


def test_collate_left_pads_and_counts_audio_tokens(librisqa):
    processor = tiny_processor()
    examples = load_split(cfg_for("librisqa", librisqa, "sqa"), "test").examples[:2]
    examples[1] = dict(examples[1], audio=tone(2.0, 16000))  # arrays are taken as 16 kHz
    batch = collate(examples, processor, rng=random.Random(0), templates=templates_for("sqa"))
    assert set(batch) == {"input_ids", "attention_mask", "input_features", "input_features_mask",
                          "references", "alternatives", "ids", "prompts", "skipped"}
    assert batch["skipped"] == []
    B, T = batch["input_ids"].shape
    assert B == 2 and batch["attention_mask"].shape == (2, T)
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padding: the ends line up
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|audio|>")
    # 1 s: 101 mel frames -> 50 stacked -> ceil(50/15) = 4 windows x 3 = 12; 2 s: 100 -> 7 x 3 = 21.
    assert (batch["input_ids"] == audio_id).sum(1).tolist() == [12, 21]
    assert audio_token_count(16000) == 12 and audio_token_count(32000) == 21
    assert batch["input_features_mask"].sum(1).tolist() == [12, 21]
    assert batch["input_features"].shape[2] == 160
    assert batch["references"] == ["answer 0.", "answer 1."]
    assert "q 0?" in batch["prompts"][0] and batch["prompts"][0].endswith("assistant<|end_of_role|>")


def test_audio_that_does_not_decode_is_named_or_skipped_in_the_batch(tmp_path, capsys):
    # The header is whole (load time reads only it), the body cut: "flac decoder lost sync".
    from grpo_speech.data.synth import synthesize
    root = tmp_path / "ast"
    synthesize("ast", str(root), 3, 1, 1, seed=0)
    over = [f"data.dir={root}", "data.n_train=3", "data.n_val=1", "data.n_test=1"]
    examples = load_split(load_config(None, over), "train").examples
    processor = tiny_processor()
    good = collate(examples, processor, rng=random.Random(0), templates=templates_for("ast"))
    clip = root / "audio/train/ast-train-000001.flac"
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    examples = load_split(load_config(None, over), "train").examples
    assert len(examples) == 3  # sf.info passes
    rng = random.Random(0)
    with pytest.raises(DataError, match=rf"{root}/train.jsonl line 2: {clip}: unreadable audio "
                                        r"\(.*\).*data.skip_bad=true"):
        collate(examples, processor, rng=rng, templates=templates_for("ast"))

    batch = collate(examples, processor, rng=random.Random(0), templates=templates_for("ast"),
                    skip_bad=True)
    assert batch["ids"] == ["ast-train-000000", "ast-train-000002"]
    assert batch["skipped"] == [f"{root}/train.jsonl line 2"]
    assert batch["input_ids"].shape[0] == 2 and len(batch["references"]) == 2
    assert f"skipped {root}/train.jsonl line 2: {clip}" in capsys.readouterr().err
    # The kept rows get the prompts they had when the clip was whole.
    assert batch["prompts"] == [good["prompts"][0], good["prompts"][2]]
    with pytest.raises(DataError, match="no row of this batch has audio that decodes"):
        collate([examples[1]], processor, rng=rng, templates=templates_for("ast"), skip_bad=True)


def test_header_seconds_reads_in_threads_and_keeps_the_order(tmp_path):
    from grpo_speech.data.audio import AudioError
    from grpo_speech.data.rows import header_seconds
    # 70 clips (over the 64 that go to the thread pool) of 0.01 s x their index; the 40th missing.
    paths = []
    for i in range(70):
        paths.append(tmp_path / f"{i}.wav")
        if i != 40:
            sf.write(paths[-1], np.zeros(160 * (i + 1), np.float32), 16000)
    got = header_seconds(paths)
    assert isinstance(got[40], AudioError) and "40.wav: audio file not found" in str(got[40])
    assert [round(s * 100) for k, s in enumerate(got) if k != 40] == [k + 1 for k in range(70) if k != 40]
