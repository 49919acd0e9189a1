"""LibriSQA Part I from disk: a JSON list of {speech_path, text, question, answer} per split and
LibriSpeech FLAC audio under `data.audio_root` (default: the dataset directory).

`speech_path` may start with `LibriSpeech/` or not, and may say `.wav` where the file is `.flac`;
both are resolved. Part I has no validation split: `data.val_fraction` of train is held out with
a fixed seed, so the validation rows never change between runs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_speech.data.rows import DataError, RowChecker, Split, example

VAL_SEED = "librisqa-validation"


def find_json(root: Path, split: str) -> Path:
    want = "test" if split == "test" else "train"
    files = sorted(p for p in root.glob("*.json") if want in p.name.lower())
    if len(files) != 1:
        raise DataError(f"{root}: expected exactly one *{want}*.json LibriSQA file, found "
                        f"{[p.name for p in files]}")
    return files[0]


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
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    index = list(range(len(rows)))
    if split != "test":
        random.Random(VAL_SEED).shuffle(index)
        n_val = round(len(rows) * val_fraction)
        index = sorted(index[:n_val] if split == "validation" else index[n_val:])
    examples = []
    for i in index:
        row, where = rows[i], f"{path} row {i}"
        if not isinstance(row, dict):
            checker.bad("malformed_row", where, "expected an object")
            continue
        if not checker.texts(where, row, ("speech_path", "text", "question", "answer")):
            continue
        audio = resolve_audio(audio_root, row["speech_path"])
        seconds = checker.audio(where, audio)
        if seconds is None:
            continue
        reference = row["answer"] if task == "sqa" else row["text"]
        fields = {"question": row["question"]} if task == "sqa" else {}
        examples.append(example(f"librisqa-{split}-{i}", task, str(audio), seconds, fields,
                                reference.strip(), where=where))
    return checker.split(examples)
