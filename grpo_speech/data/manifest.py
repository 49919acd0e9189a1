"""Manifests: a split of a real dataset as one JSONL file, read in seconds where building it reads
every clip's header (minutes for CoVoST 2 train's 289k clips).

    python -m grpo_speech prepare covost2 --cv-dir CV4/en --covost-tsv covost_v2.en_de.tsv --out DIR
    python -m grpo_speech prepare librisqa --librisqa-dir LibriSQA --librispeech-dir . --out DIR

Line 1 is a header {"manifest": 1, "source", "task", "split", "skipped", "rows", "key",
"prompt_tokens_key"}; each further line is one example of load_split (rows.py), its audio a path
or {"parquet": file, "row": n}, with "prompt_tokens" (the longest prompt of the task's templates,
audio positions included) when it was written for a model. A manifest holds every readable row
with its duration: length limits are applied when training reads it, to train only.

load_split reads `manifest.{task}.{split}.jsonl` from data.dir when `prepare` wrote one there.
Otherwise it builds the manifest once and caches it (data.dir/.grpo_speech_cache, or
~/.cache/grpo_speech when data.dir is read-only) under a key of the split's source files (path,
size, modification time) and the config keys that change its rows; a resumed run reads it back.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from grpo_speech.data.audio import ParquetAudio
from grpo_speech.data.rows import DataError, Split

VERSION = 1


def manifest_name(task: str, split: str) -> str:
    return f"manifest.{task}.{split}.jsonl"


def _audio_json(audio) -> str | dict:
    if isinstance(audio, ParquetAudio):
        return {"parquet": audio.path, "row": audio.row}
    if isinstance(audio, (str, Path)):
        return str(audio)
    raise DataError(f"a manifest holds audio files or parquet rows, not {type(audio).__name__}")


def write_manifest(path: Path, split: Split, meta: dict, prompt_tokens: list[int] | None = None
                   ) -> None:
    """The header line (meta, the split's skipped counts and row count), then one example a line.
    Written beside and renamed into place, so a reader never sees half a manifest."""
    header = {"manifest": VERSION, **meta, "rows": len(split.examples), "skipped": split.skipped}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for i, ex in enumerate(split.examples):
            row = {**ex, "audio": _audio_json(ex["audio"])}
            if prompt_tokens is not None:
                row["prompt_tokens"] = prompt_tokens[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_header(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())
        except ValueError as e:
            raise DataError(f"{path} line 1: not a manifest header ({e})") from None
    if not isinstance(header, dict) or header.get("manifest") != VERSION:
        raise DataError(f"{path} line 1: not a version-{VERSION} manifest header: rewrite it with "
                        f"`python -m grpo_speech prepare`")
    return header


def read_manifest(path: Path) -> tuple[dict, Split]:
    """(header, Split) of a manifest; an example keeps its "prompt_tokens" when it has one."""
    header = read_header(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        f.readline()
        for line_no, line in enumerate(f, start=2):
            try:
                ex = json.loads(line)
                if isinstance(ex["audio"], dict):
                    ex["audio"] = ParquetAudio(ex["audio"]["parquet"], ex["audio"]["row"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path} line {line_no}: not a manifest row ({e!r})") from None
            if "prompt_tokens" in ex:
                ex["prompt_tokens_key"] = header.get("prompt_tokens_key")
            examples.append(ex)
    if len(examples) != header["rows"]:
        raise DataError(f"{path}: the header says {header['rows']} rows, the file holds "
                        f"{len(examples)} (cut short: write it again)")
    return header, Split(examples, dict(header["skipped"]))


def source_key(files: list[Path], settings: dict) -> str:
    """A hash of the split's source files (path, size, modification time) and the settings that
    change its rows: the cache key. Audio files are not in it (289k stats); a clip changed on
    disk after the manifest was built is found when its batch is collated."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"version": VERSION, "files": stats, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dirs(data_dir: Path) -> list[Path]:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grpo_speech"
    return [data_dir / ".grpo_speech_cache", home / "manifests"]


def cached(data_dir: Path, name: str, key: str, build) -> Split:
    """The split cached under `name` and `key`, or build() it and cache it for the next start.
    A cache that cannot be written (read-only places) costs only the rebuild next time."""
    file_name = f"{name}.{key}.jsonl"
    for d in cache_dirs(data_dir):
        if (d / file_name).is_file():
            try:
                return read_manifest(d / file_name)[1]
            except DataError:
                break  # torn or foreign: build it again
    split = build()
    for d in cache_dirs(data_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
            write_manifest(d / file_name, split, {"key": key, "cache_of": name})
            break
        except OSError:
            continue
    return split
