"""Synthetic spoken datasets made offline with eSpeak NG (the embedded default; nothing downloaded).

    python -m grpo_speech synth --task ast --out data/synthetic/ast --n-train 2000

writes OUT/{train,validation,test}.jsonl and OUT/audio/{split}/*.flac (16 kHz mono). Same
arguments, same bytes. Each row's "references" lists every correct output, its reference first
(the German renderings of a sentence, the answers to a question; the text itself for asr).
The jsonl files and manifest.json are written last, so a killed run never looks complete; a
complete directory for the same arguments is left alone.

It writes only into a missing or empty directory or one it wrote itself (its manifest.json, or
the marker of an unfinished run, `.synth-incomplete`); anything else is the user's data and an
error (a mistyped --out must not destroy a dataset), and it never deletes a file it did not
write. A directory it wrote in an older
format (FORMAT_VERSION) is remade.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from grpo_speech.data.audio import SAMPLE_RATE, resample
from grpo_speech.data.grammar import DOMAINS, sentence_pairs, sentence_variants, word_lists
from grpo_speech.data.passages import qa_triples
from grpo_speech.data.rows import DataError
from grpo_speech.distributed import ceil_div

TASKS = ("ast", "sqa", "asr", "words")  # words: lists of 1-3 words (pretraining only)
SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 2  # 2: rows have "references"
ESPEAK_RATE = 22050
SHARD = 128  # utterances per worker process (see _synth_shard for why a process per shard)

# Variants without "breath": eSpeak draws breath noise from a source that differs between runs.
LANGS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "klatt", "klatt2", "klatt4",
            "john", "linda", "david"]


class Espeak:
    """eSpeak NG through ctypes, synchronous mode. Its state is global: one per process."""

    def __init__(self):
        import espeakng_loader
        self.lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                 ctypes.c_void_p)

        def on_audio(wav, n, events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = proto(on_audio)  # kept alive: eSpeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """(S,) int16 samples at self.sample_rate (22050 Hz)."""
        self._chunks.clear()
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(1, rate, 0)
        self.lib.espeak_SetParameter(3, pitch, 0)
        data = text.encode()
        # 1 | 0x1000: UTF-8 text, pause at the end of the clip.
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1 | 0x1000, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _synth_shard(job: tuple[str, list[tuple[str, str, str, int, int]]]) -> list[float]:
    """Synthesize and write one shard; returns clip durations in seconds.

    eSpeak carries state from one utterance to the next (the same call gives other samples the
    second time), so each shard runs in a fresh process: the bytes then depend on the shard alone,
    not on the number of workers or on which worker took it."""
    torch.set_num_threads(1)
    out_dir, items = job
    engine = Espeak()
    waves = [engine.say(text, voice, rate, pitch) for _, text, voice, rate, pitch in items]
    # One batched resample of the zero-padded clips: rows do not interact, padding is silence.
    lens = [len(w) for w in waves]
    batch = np.zeros((len(waves), max(lens)), np.float32)
    for i, w in enumerate(waves):
        batch[i, :len(w)] = w / 32768.0
    out = resample(batch, engine.sample_rate, SAMPLE_RATE).numpy()
    seconds = []
    for (rel, *_), w, n in zip(items, out, lens):
        n16 = ceil_div(n * SAMPLE_RATE, engine.sample_rate)
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pcm = np.round(np.clip(w[:n16], -1.0, 32767 / 32768) * 32768).astype(np.int16)
        # Encoded in memory: writing to a path makes libsndfile fsync every clip (4 ms each).
        buf = io.BytesIO()
        sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        path.write_bytes(buf.getvalue())
        seconds.append(n16 / SAMPLE_RATE)
    return seconds


def task_texts(task: str, n: int, seed: int, domain: str = "target") -> list[dict]:
    """n distinct examples' text fields for a task (no audio); "references": every correct
    output, the reference ("translation", "answer", "text") first."""
    if task == "ast":
        return [{"sentence": en, "translation": de, "references": refs}
                for en, de, refs in sentence_variants(n, seed, domain)]
    if task == "sqa":
        return [{"text": ex["text"], "question": ex["question"], "answer": ex["answer"],
                 "references": ex["answers"]} for ex in qa_triples(n, seed, domain)]
    if task == "asr":  # two thirds grammar sentences, one third sqa passages, mixed
        k = n // 3
        rows = [{"text": en, "references": [en]} for en, _ in sentence_pairs(n - k, seed, domain)]
        rows += [{"text": ex["text"], "references": [ex["text"]]}
                 for ex in qa_triples(k, seed, domain)]
        random.Random(f"asr-mix-{domain}-{seed}").shuffle(rows)
        return rows
    if task == "words":
        return [{"text": text, "references": [text]} for text in word_lists(n, seed, domain)]
    raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")


def spoken_text(task: str, row: dict) -> str:
    return row["sentence"] if task == "ast" else row["text"]


def text_corpus(task: str, n: int, seed: int, domain: str = "target") -> list[str]:
    """Every text field of n examples (English and German, passages, questions, answers): BPE
    training. The other references are left out: the corpus, and so the tokenizer, holds one
    output per example, like a real data set's."""
    out = []
    for row in task_texts(task, n, seed, domain):
        out += [v for v in row.values() if isinstance(v, str)]
    return out


def _speakers(n: int, tag: str) -> list[tuple[str, int, int]]:
    rng = random.Random(f"speaker-{tag}")
    return [(f"{rng.choice(LANGS)}+{rng.choice(VARIANTS)}", rng.randint(150, 220),
             rng.randint(25, 75)) for _ in range(n)]


MANIFEST = "manifest.json"
MARKER = ".synth-incomplete"  # the manifest of a run under way: its files are ours to redo


def _read_manifest(path: Path) -> dict | None:
    """The manifest synth wrote at `path` (its exact keys), else None."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = {"task", "n_train", "n_val", "n_test", "seed", "domain", "version"}
    return old if isinstance(old, dict) and set(old) == keys else None


def owner_manifest(out: Path) -> dict | None:
    """The arguments synth wrote `out` with (finished or not); None for a directory synth did not
    write. Raises DataError for a non-empty directory that is not synth's."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        raise DataError(f"{out} is a file, not a dataset directory")
    for name in (MANIFEST, MARKER):
        manifest = _read_manifest(out / name)
        if manifest is not None:
            return manifest
    raise DataError(
        f"{out} holds files that `synth` did not write (no {MANIFEST} of its own): it is left "
        "alone. To read your own data set data.source (librisqa or covost2); to synthesize, "
        "choose an empty or new directory (data.dir=... or `synth --out ...`)")


def _describe(m: dict) -> str:
    return (f"task={m['task']} n_train={m['n_train']} n_val={m['n_val']} n_test={m['n_test']} "
            f"seed={m['seed']} domain={m['domain']} version={m['version']}")


def _older_format(have: dict, want: dict) -> bool:
    """Whether `have` is the dataset of the same arguments in an older format: synth's own, to be
    remade (the spoken texts, and so the audio, are the same; the rows gained fields)."""
    version = have.get("version")
    return (isinstance(version, int) and version < want["version"]
            and {k: v for k, v in have.items() if k != "version"}
            == {k: v for k, v in want.items() if k != "version"})


def check_synthetic(out: Path, task: str, n_train: int, n_val: int, n_test: int, seed: int,
                    domain: str = "target") -> bool:
    """Whether `out` holds the complete dataset of these arguments (False: missing, empty or an
    unfinished run of the same arguments, for `synthesize` to make). A dataset of other arguments
    is an error, not a rebuild: the config names another data set than the directory holds."""
    want = _manifest(task, n_train, n_val, n_test, seed, domain)
    have = owner_manifest(out)
    if have is None or _older_format(have, want):
        return False
    if have != want:
        raise DataError(
            f"{out} holds the synthetic dataset {_describe(have)}, but the config asks for "
            f"{_describe(want)}: set data.n_train/n_val/n_test/synth_seed to match it, or point "
            "data.dir at another (empty or new) directory")
    return (out / MANIFEST).is_file() and all((out / f"{s}.jsonl").is_file() for s in SPLITS)


def _manifest(task, n_train, n_val, n_test, seed, domain) -> dict:
    return {"task": task, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
            "domain": domain, "version": FORMAT_VERSION}


def synthesize(task: str, out_dir: str, n_train: int, n_val: int, n_test: int, seed: int,
               domain: str = "target", workers: int = 2) -> None:
    """Write a spoken dataset for `task` (ast, sqa or asr) to out_dir (see the module docstring).
    domain: "target" (the evaluation distribution) or "pretrain" (same words mostly, other names,
    frames and some nouns). Test examples are drawn first, so the test split does not move when
    n_train changes."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: expected one of {DOMAINS}")
    out = Path(out_dir)
    owner_manifest(out)  # raises for a directory synth did not write, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    # One synthesis per directory at a time: parallel runs of a grid, or several jobs started on a
    # fresh machine, wait here for the first and then find its dataset complete.
    with _exclusive(out):
        _synthesize(task, out, n_train, n_val, n_test, seed, domain, workers)


@contextlib.contextmanager
def _exclusive(out: Path):
    """An exclusive advisory lock (flock) on the directory itself, held for the block; released
    by the OS if the process dies."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{out}: another process is synthesizing it; waiting", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _synthesize(task: str, out: Path, n_train: int, n_val: int, n_test: int, seed: int,
                domain: str, workers: int) -> None:
    manifest = _manifest(task, n_train, n_val, n_test, seed, domain)
    if owner_manifest(out) == manifest and (out / MANIFEST).is_file() \
            and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
        print(f"{out}: complete for these arguments, nothing to do")
        return
    # The marker first: from here until the manifest is written the directory is an unfinished
    # run of ours. Then drop the files that made it look complete (all written by synth).
    (out / MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
    for name in [MANIFEST] + [f"{s}.jsonl" for s in SPLITS]:
        (out / name).unlink(missing_ok=True)

    t0 = time.time()
    texts = task_texts(task, n_test + n_val + n_train, seed, domain)
    counts = {"test": n_test, "validation": n_val, "train": n_train}
    speakers = _speakers(len(texts), f"{task}-{domain}-{seed}")
    rows, items, start = {}, [], 0
    for split in ("test", "validation", "train"):
        rows[split] = []
        for i in range(counts[split]):
            k = start + i
            ex_id = f"{task}-{split}-{i:06d}"
            rel = f"audio/{split}/{ex_id}.flac"
            voice, rate, pitch = speakers[k]
            rows[split].append({"id": ex_id, "audio": rel, **texts[k],
                                "speaker": f"{voice}:{rate}:{pitch}"})
            items.append((rel, spoken_text(task, texts[k]), voice, rate, pitch))
        start += counts[split]

    shards = [(str(out), items[i:i + SHARD]) for i in range(0, len(items), SHARD)]
    # Imports and the resampling filter are made here once; forked workers inherit them.
    resample(np.zeros((1, 441), np.float32), ESPEAK_RATE)
    ctx = mp.get_context("fork")
    with ctx.Pool(max(1, workers), maxtasksperchild=1) as pool:
        seconds = [s for shard in pool.imap(_synth_shard, shards) for s in shard]

    k = 0
    for split in ("test", "validation", "train"):
        for row in rows[split]:
            row["seconds"] = round(seconds[k], 3)
            k += 1
        tmp = out / f"{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out / f"{split}.jsonl")
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    (out / MARKER).unlink()
    dt = time.time() - t0
    print(f"{out}: {len(items)} utterances, {sum(seconds) / 3600:.2f} h of audio "
          f"(mean {np.mean(seconds):.2f} s) in {dt:.1f} s = {len(items) / dt:.0f} utterances/s")
