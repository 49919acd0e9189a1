"""CoVoST 2 English->German from disk, in either layout:
- official TSVs `*{train,dev,test}.tsv` (path, sentence, translation, client_id; tab separated,
  no quoting: sentences hold quote characters) with Common Voice clips under `data.audio_root`
  (default: DIR/clips), mp3 at 48 kHz, resampled when a batch is built;
- parquet files whose name holds the split (train, validation or dev, test) with columns
  audio {bytes, path}, sentence, translation and optionally id; the audio bytes stay encoded.
"""
from __future__ import annotations

import csv
from pathlib import Path

from grpo_speech.data.rows import DataError, RowChecker, Split, example

SPLIT_NAMES = {"train": ("train",), "validation": ("dev", "validation"), "test": ("test",)}


def _files(root: Path, split: str, ext: str) -> list[Path]:
    names = SPLIT_NAMES[split]
    return sorted(p for p in root.rglob(f"*.{ext}")
                  if any(n in p.name.lower() for n in names))


def _reference(task: str, row: dict) -> str:
    if task == "ast":
        return row["translation"].strip()
    if task == "asr":
        return row["sentence"].strip()
    raise DataError(f"CoVoST 2 has no task {task!r} (ast or asr)")


def load(root: Path, audio_root: Path | None, split: str, task: str, checker: RowChecker) -> Split:
    tsvs, parquets = _files(root, split, "tsv"), _files(root, split, "parquet")
    if tsvs:
        return _load_tsv(tsvs, audio_root or root / "clips", split, task, checker)
    if parquets:
        return _load_parquet(parquets, split, task, checker)
    raise DataError(f"{root}: no CoVoST 2 {split} file (*{SPLIT_NAMES[split][0]}.tsv or "
                    f"*{SPLIT_NAMES[split][0]}*.parquet)")


def _load_tsv(files: list[Path], clips: Path, split: str, task: str, checker: RowChecker) -> Split:
    _reference(task, {"translation": "", "sentence": ""})  # unknown task: fail before reading
    examples = []
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            need = ("path", "sentence", "translation")
            if header is None or any(k not in header for k in need):
                raise DataError(f"{path}: header must name {need}, got {header}")
            for line_no, cells in enumerate(reader, start=2):
                where = f"{path} line {line_no}"
                if len(cells) != len(header):
                    checker.bad("malformed_row", where,
                                f"{len(cells)} tab-separated fields, header has {len(header)}")
                    continue
                row = dict(zip(header, cells))
                if not checker.texts(where, row, need):
                    continue
                audio = clips / row["path"]
                if not audio.is_file() and (clips / "clips" / row["path"]).is_file():
                    audio = clips / "clips" / row["path"]
                seconds = checker.audio(where, audio)
                if seconds is None:
                    continue
                fields = {}
                examples.append(example(f"covost2-{split}-{Path(row['path']).stem}", task,
                                        str(audio), seconds, fields, _reference(task, row),
                                        where=where))
    return checker.split(examples)


def _load_parquet(files: list[Path], split: str, task: str, checker: RowChecker) -> Split:
    import pyarrow.parquet as pq

    _reference(task, {"translation": "", "sentence": ""})
    examples = []
    for path in files:
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        need = ("audio", "sentence", "translation")
        missing = [k for k in need if k not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing columns {missing} (has {table.column_names})")
        for i, row in enumerate(table.to_pylist()):
            where = f"{path} row {i}"
            audio = row["audio"]
            if not isinstance(audio, dict) or not isinstance(audio.get("bytes"), bytes):
                checker.bad("malformed_row", where, "audio must be a struct with encoded bytes")
                continue
            if not checker.texts(where, row, ("sentence", "translation")):
                continue
            name = f"{where} ({audio.get('path') or 'embedded audio'})"
            seconds = checker.audio(where, audio["bytes"], name)
            if seconds is None:
                continue
            ex_id = str(row.get("id") or Path(audio.get("path") or f"{path.stem}-{i}").stem)
            examples.append(example(f"covost2-{split}-{ex_id}", task, audio["bytes"], seconds, {},
                                    _reference(task, row), where=name))
    return checker.split(examples)
