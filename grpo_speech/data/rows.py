"""The common example shape of every data source, and the bad-row policy (raise or skip and count).

An example is {"id", "task", "audio", "seconds", "prompt_fields", "reference", "alternatives",
"where"}: `reference` is the one reference answer (CoVoST 2 and LibriSQA give one; training rewards
and SFT targets use it), `alternatives` the other correct answers stored beside it (the synthetic
tasks know every correct rendering; real sources have none). `audio`
is a file path, encoded bytes, or a ParquetAudio (file, row) whose bytes stay in the parquet file
(CoVoST 2 from the hub), decoded to 16 kHz only when a batch is collated (collate.py), so a large
split costs no memory for audio. Loading reads only
each clip's header; a body that does not decode is found in the batch, where `where` (the source
file and line or row) names it, so the user can fix or drop that one row.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from grpo_speech.config import UserError
from grpo_speech.data.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, audio_seconds, too_short


class DataError(UserError, ValueError):
    pass


@dataclass
class Split:
    examples: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows left out at load time, by reason: missing_audio, unreadable_audio, empty_text,
    malformed_row, too_long (train only: validation and test are never cut). Empty when nothing
    was skipped. (Rows whose audio body does not
    decode are skipped when their batch is collated and counted there: `collate`.)"""


class RowChecker:
    """Raises DataError naming file and row, or (skip_bad) counts the row as skipped."""

    def __init__(self, skip_bad: bool, max_seconds: float):
        self.skip_bad = skip_bad
        self.max_seconds = max_seconds
        self.skipped: Counter = Counter()

    def bad(self, reason: str, where: str, msg: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {msg} (set data.skip_bad=true to skip such rows)")
        self.skipped[reason] += 1

    def texts(self, where: str, row: dict, keys: tuple[str, ...]) -> bool:
        for k in keys:
            if k not in row or not isinstance(row[k], str):
                self.bad("malformed_row", where, f"missing or non-text field {k!r}")
                return False
            if not row[k].strip():
                self.bad("empty_text", where, f"empty field {k!r}")
                return False
        return True

    def audio(self, where: str, src, name: str = "", known: float | AudioError | None = None
              ) -> float | None:
        """Clip duration, or None when the row is bad (missing, unreadable, too long). `known`: the
        result of audio_seconds(src) when it was read already (header_seconds)."""
        try:
            seconds = audio_seconds(src, name) if known is None else known
            if isinstance(seconds, AudioError):
                raise seconds
        except AudioError as e:
            self.bad("missing_audio" if "not found" in str(e) else "unreadable_audio", where, str(e))
            return None
        if seconds <= 0:
            self.bad("unreadable_audio", where, f"{name or src}: empty audio")
            return None
        if seconds * SAMPLE_RATE < MIN_SAMPLES:
            self.bad("unreadable_audio", where, too_short(str(name or src), seconds))
            return None
        if seconds > self.max_seconds:
            # Too long is not an error: such clips are always skipped and counted.
            self.skipped["too_long"] += 1
            return None
        return seconds

    def split(self, examples: list[dict]) -> Split:
        return Split(examples, dict(self.skipped))


def header_seconds(srcs: list, names: list[str] | None = None, workers: int = 16
                   ) -> list[float | AudioError]:
    """audio_seconds of each source (named in errors by `names`, when given), or its AudioError,
    in order. Threads read the headers: libsndfile releases the GIL while it reads, so
    file-system latency overlaps (a CoVoST train split has 289k clips)."""
    def one(src, name):
        try:
            return audio_seconds(src, name)
        except AudioError as e:
            return e
    names = names or [""] * len(srcs)
    if len(srcs) < 64:
        return [one(s, n) for s, n in zip(srcs, names)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, srcs, names, chunksize=256))


def example(ex_id: str, task: str, audio, seconds: float, prompt_fields: dict, reference: str,
            where: str = "", alternatives: list[str] | tuple = ()) -> dict:
    return {"id": ex_id, "task": task, "audio": audio, "seconds": seconds,
            "prompt_fields": prompt_fields, "reference": reference,
            "alternatives": [a for a in alternatives if a != reference], "where": where or ex_id}


def all_references(ex: dict) -> list[str]:
    """The reference first, then the other correct answers (multi-reference scores)."""
    return [ex["reference"]] + list(ex.get("alternatives", ()))
