"""Datasets for the three tasks (ast, sqa, asr) from every source, in one example shape.

    split = load_split(cfg, "train")   # Split(examples, skipped)
    batch = collate(split.examples[:8], processor, rng=random.Random(0), templates=templates_for("ast"))

Sources (cfg.data.source): synthetic (made offline with eSpeak NG on first use, see synth.py),
librisqa and covost2 (read from disk). Example shape and bad-row policy: rows.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from grpo_speech.data.collate import audio_token_count, collate
from grpo_speech.data.prompts import templates_for
from grpo_speech.data.rows import DataError, RowChecker, Split, example

SPLITS = ("train", "validation", "test")
SYNTH_FIELDS = {"ast": ("sentence", "translation"), "sqa": ("text", "question", "answer"),
                "asr": ("text",), "words": ("text",)}

__all__ = ["DataError", "Split", "audio_token_count", "collate", "load_split", "templates_for"]


def _synthetic_row(task: str, row: dict) -> tuple[dict, str]:
    if task == "ast":
        return {}, row["translation"]
    if task == "sqa":
        return {"question": row["question"]}, row["answer"]
    return {}, row["text"]


def _alternatives(row: dict, reference: str, where: str, checker: RowChecker) -> list[str] | None:
    """The other correct answers of a row: its optional "references" list (every correct answer,
    the reference among them) minus the reference. None when the list is malformed."""
    refs = row.get("references", [reference])
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        checker.bad("malformed_row", where, '"references" must be a non-empty list of texts')
        return None
    if reference not in refs:
        checker.bad("malformed_row", where, '"references" must hold the row\'s own reference')
        return None
    return [r for r in refs if r != reference]


def load_synthetic(root: Path, split: str, task: str, checker: RowChecker) -> Split:
    path = root / f"{split}.jsonl"
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except ValueError as e:
                checker.bad("malformed_row", where, f"not JSON ({e})")
                continue
            if not isinstance(row, dict):
                checker.bad("malformed_row", where, "expected a JSON object")
                continue
            if not checker.texts(where, row, ("id", "audio") + SYNTH_FIELDS[task]):
                continue
            audio = root / row["audio"]
            seconds = checker.audio(where, audio)
            if seconds is None:
                continue
            fields, reference = _synthetic_row(task, row)
            alternatives = _alternatives(row, reference, where, checker)
            if alternatives is None:
                continue
            examples.append(example(row["id"], task, str(audio), seconds, fields, reference,
                                    where=where, alternatives=alternatives))
    return checker.split(examples)


def load_split(cfg, split: str) -> Split:
    """Examples of one split (train, validation or test) of cfg.task from cfg.data.source.
    Synthetic data is synthesized first when its directory is missing, empty or an unfinished
    synthesis of the same arguments; a directory of other data is an error (synth.py). Real
    datasets are read from their manifest (manifest.py): the one `prepare` wrote into data.dir,
    else one built on first use and cached. Length limits cut the train split only."""
    from grpo_speech.config import data_dir

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    d = cfg.data
    root = data_dir(cfg)
    if d.source == "synthetic":
        from grpo_speech.data.synth import check_synthetic, synthesize
        if not check_synthetic(root, cfg.task, d.n_train, d.n_val, d.n_test, d.synth_seed):
            synthesize(cfg.task, str(root), d.n_train, d.n_val, d.n_test, d.synth_seed)
        # Length limits are for training (memory and the paper's prompt budget); validation and
        # test are scored whole, as the papers' tables are (LibriSpeech test-clean runs to ~35 s).
        checker = RowChecker(d.skip_bad, d.max_audio_seconds if split == "train" else math.inf)
        return load_synthetic(root, split, cfg.task, checker)
    if not root.is_dir():
        raise DataError(f"data.dir {str(root)!r} is not a directory")
    whole = _real_split(cfg, root.resolve(), split)
    return limit_seconds(whole, d.max_audio_seconds) if split == "train" else whole


def limit_seconds(split: Split, max_seconds: float) -> Split:
    """The split without clips over max_seconds, counted as too_long."""
    kept = [e for e in split.examples if e["seconds"] <= max_seconds]
    skipped = dict(split.skipped)
    if len(kept) < len(split.examples):
        skipped["too_long"] = skipped.get("too_long", 0) + len(split.examples) - len(kept)
    return Split(kept, skipped)


def source_files(cfg, root: Path, split: str) -> list[Path]:
    """The files a real split's rows come from (errors name what is missing)."""
    if cfg.data.source == "librisqa":
        from grpo_speech.data import librisqa
        return [librisqa.find_json(root, split)]
    from grpo_speech.data import covost
    return covost.split_files(root, cfg.data.covost_pair, split)


def build_split(cfg, root: Path, split: str) -> Split:
    """Every readable row of a real split, with no length limit: what a manifest holds."""
    d = cfg.data
    checker = RowChecker(d.skip_bad, math.inf)
    audio_root = Path(d.audio_root).resolve() if d.audio_root else None
    if d.source == "librisqa":
        from grpo_speech.data import librisqa
        return librisqa.load(root, audio_root or root, split, cfg.task, checker, d.val_fraction)
    if d.source == "covost2":
        from grpo_speech.data import covost
        return covost.load(root, audio_root, split, cfg.task, checker, d.covost_pair)
    raise ValueError(f"unknown data.source {d.source!r}")


def _real_split(cfg, root: Path, split: str) -> Split:
    from grpo_speech.data import manifest

    d = cfg.data
    given = root / manifest.manifest_name(cfg.task, split)
    if given.is_file():
        header = manifest.read_header(given)
        want = {"source": d.source, "task": cfg.task, "split": split}
        if d.source == "covost2":
            want["covost_pair"] = d.covost_pair
        have = {k: header.get(k) for k in want}
        if have != want:
            raise DataError(f"{given} holds {have}, the config asks for {want}")
        return manifest.read_manifest(given)[1]
    settings = {"source": d.source, "task": cfg.task, "split": split, "root": str(root),
                "audio_root": str(Path(d.audio_root).resolve()) if d.audio_root else "",
                "skip_bad": d.skip_bad}
    if d.source == "covost2":
        settings["covost_pair"] = d.covost_pair
    if d.source == "librisqa":
        settings["val_fraction"] = d.val_fraction
    key = manifest.source_key(source_files(cfg, root, split), settings)
    return manifest.cached(root, f"{d.source}-{cfg.task}-{split}", key,
                           lambda: build_split(cfg, root, split))
