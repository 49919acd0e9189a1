"""LibriSQA Part I from disk: `LibriSQA-PartI/LibriSQA-PartI-{train,test}.json`, rows {speech_path,
text, question, answer, duration} (a JSON array, or JSON lines), and LibriSpeech FLAC audio
(train-clean-360, test-clean) under `data.audio_root` (default: the dataset directory).
`data.dir` may be the release's root (holding LibriSQA-PartI/ and LibriSQA-PartII/) or its
LibriSQA-PartI/ folder. Part II (multiple choice: question_and_option, an answer letter) is not an
open-answer task and is refused by name.

`speech_path` may start with `LibriSpeech/` or not, and may say `.wav` where the file is `.flac`;
both are resolved. Part I has no validation split: `data.val_fraction` of train is held out with
a fixed seed, so the validation rows never change between runs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_speech.data.rows import DataError, RowChecker, Split, example, header_seconds

VAL_SEED = "librisqa-validation"


PART_II = ("data.dir {root} is LibriSQA Part II (multiple choice: question_and_option and an "
           "answer letter), which is not supported: point data.dir at the release's root or at "
           "its LibriSQA-PartI/ folder")


def part_one(root: Path) -> Path:
    """The folder of Part I's JSON files: root itself, or its LibriSQA-PartI/ subfolder."""
    if "partii" in root.name.lower().replace("-", "").replace("_", ""):
        raise DataError(PART_II.format(root=root))
    sub = root / "LibriSQA-PartI"
    return sub if sub.is_dir() else root


def find_json(root: Path, split: str) -> Path:
    want = "test" if split == "test" else "train"
    folder = part_one(root)
    files = sorted(p for p in list(folder.glob("*.json")) + list(folder.glob("*.jsonl"))
                   if want in p.name.lower() and "partii" not in p.name.lower())
    if len(files) != 1:
        part_two = sorted(p.name for p in folder.glob("*PartII*.json*"))
        if part_two and not files:
            raise DataError(PART_II.format(root=root) + f" (found {part_two})")
        raise DataError(f"{folder}: expected exactly one *{want}*.json LibriSQA Part I file "
                        f"(LibriSQA-PartI/LibriSQA-PartI-{want}.json), found "
                        f"{[p.name for p in files]}")
    return files[0]


def read_rows(path: Path) -> list:
    """The rows of a JSON array file or a JSON lines file (one object a line); errors name the
    line that does not parse."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{path} line {line_no}: not JSON ({e}); expected a JSON array "
                                f"or one JSON object a line") from None
    return rows


def resolve_audio(audio_root: Path, speech_path: str) -> Path:
    """The file on disk for a speech_path, trying the LibriSpeech/ prefix and .flac/.wav suffixes;
    the first candidate when none exists (the error then names it)."""
    rel = Path(speech_path)
    rels = [rel]
    if rel.parts and rel.parts[0] == "LibriSpeech":
        rels.append(Path(*rel.parts[1:]))
    else:
        rels.append(Path("LibriSpeech") / rel)
    candidates = []
    for r in rels:
        base = r if r.is_absolute() else audio_root / r
        candidates += [base, base.with_suffix(".flac"), base.with_suffix(".wav")]
    return next((c for c in candidates if c.is_file()), candidates[0])


def load(root: Path, audio_root: Path, split: str, task: str, checker: RowChecker,
         val_fraction: float) -> Split:
    if task not in ("sqa", "asr"):
        raise DataError(f"LibriSQA has no task {task!r} (sqa or asr)")
    path = find_json(root, split)
    rows = read_rows(path)
    index = list(range(len(rows)))
    if split != "test":
        random.Random(VAL_SEED).shuffle(index)
        n_val = round(len(rows) * val_fraction)
        index = sorted(index[:n_val] if split == "validation" else index[n_val:])
    # Headers are read first, all at once (header_seconds), then rows checked in order: the
    # first bad row is the one reported.
    audio_of = [resolve_audio(audio_root, rows[i]["speech_path"])
                if isinstance(rows[i], dict) and isinstance(rows[i].get("speech_path"), str)
                else None for i in index]
    known = iter(header_seconds([a for a in audio_of if a is not None]))
    examples = []
    for i, audio in zip(index, audio_of):
        row, where = rows[i], f"{path} row {i}"
        result = next(known) if audio is not None else None
        if not isinstance(row, dict):
            checker.bad("malformed_row", where, "expected an object")
            continue
        if not checker.texts(where, row, ("speech_path", "text", "question", "answer")):
            continue
        seconds = checker.audio(where, audio, known=result)
        if seconds is None:
            continue
        reference = row["answer"] if task == "sqa" else row["text"]
        fields = {"question": row["question"]} if task == "sqa" else {}
        examples.append(example(f"librisqa-{split}-{i}", task, str(audio), seconds, fields,
                                reference.strip(), where=where))
    return checker.split(examples)
