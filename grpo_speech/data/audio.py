"""Audio I/O for every data source: read FLAC/WAV/MP3 with soundfile, down-mix to mono, resample
to 16 kHz with torchaudio. An audio source is a file path, the encoded bytes of a file, or a
ParquetAudio: one row of a parquet file that embeds the encoded bytes (the hub's CoVoST 2 copies),
read only when the clip is needed, so no process holds a split's audio. Errors name the file (and
the row).
"""
from __future__ import annotations

import io
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from grpo_speech.config import UserError

SAMPLE_RATE = 16000
# Granite Speech's features are a centred STFT (n_fft 512) that reflect-pads 256 samples on each
# side, which needs more samples than that: a shorter clip makes the feature extractor raise.
MIN_SAMPLES = 257

_RESAMPLERS: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


class AudioError(UserError, ValueError):
    pass


def resample(wave: np.ndarray | torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Resample a (..., S) waveform. The filter bank of each rate pair is built once and cached:
    building it dominated the cost of short clips."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if orig_sr == new_sr:
        return wave
    key = (orig_sr, new_sr)
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = torchaudio.transforms.Resample(orig_sr, new_sr)
    with torch.no_grad():
        return _RESAMPLERS[key](wave)


@dataclass(frozen=True)
class ParquetAudio:
    """The encoded audio of row `row` (counted from 0 over the whole file) of a parquet file whose
    `audio` column is a struct {bytes, path}."""
    path: str
    row: int

    def __str__(self) -> str:
        return f"{self.path} row {self.row}"


# Per process: each parquet file's reader and its row groups' first rows, and the last row group
# read (evaluation reads rows in file order, so one row group serves many clips in a row).
_PARQUET: dict[str, tuple] = {}
_LAST_GROUP: dict[str, tuple[int, list]] = {}


def parquet_bytes(src: ParquetAudio) -> bytes:
    """The encoded bytes of one parquet row, reading only its row group's audio column."""
    import pyarrow.parquet as pq

    if src.path not in _PARQUET:
        if not Path(src.path).is_file():
            raise AudioError(f"{src}: parquet file not found")
        try:
            pf = pq.ParquetFile(src.path)
        except Exception as e:
            raise AudioError(f"{src}: unreadable parquet file ({e})") from None
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        _PARQUET[src.path] = (pf, starts)
    pf, starts = _PARQUET[src.path]
    if not 0 <= src.row < starts[-1]:
        raise AudioError(f"{src}: the file has {starts[-1]} rows")
    group = bisect_right(starts, src.row) - 1
    last = _LAST_GROUP.get(src.path)
    if last is None or last[0] != group:
        last = (group, pf.read_row_group(group, columns=["audio"]).column("audio").to_pylist())
        _LAST_GROUP.clear()  # one row group held at a time in all
        _LAST_GROUP[src.path] = last
    cell = last[1][src.row - starts[group]]
    if not isinstance(cell, dict) or not isinstance(cell.get("bytes"), bytes):
        raise AudioError(f"{src}: audio must be a struct with encoded bytes")
    return cell["bytes"]


def _open(src: str | Path | bytes | ParquetAudio):
    if isinstance(src, ParquetAudio):
        return io.BytesIO(parquet_bytes(src))
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)


def describe(src: str | Path | bytes | ParquetAudio, name: str = "") -> str:
    return name or (f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else str(src))


def _missing(src) -> bool:
    return isinstance(src, (str, Path)) and not Path(src).is_file()


def audio_seconds(src: str | Path | bytes | ParquetAudio, name: str = "") -> float:
    """Duration from the file header (cheap); raises AudioError for a missing or unreadable file."""
    if _missing(src):
        raise AudioError(f"{describe(src, name)}: audio file not found")
    f = _open(src)  # outside the try: a missing parquet file says so, not "unreadable audio"
    try:
        info = sf.info(f)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        raise AudioError(f"{describe(src, name)}: unreadable audio ({e})") from None
    if info.samplerate <= 0:
        raise AudioError(f"{describe(src, name)}: unreadable audio (sample rate {info.samplerate})")
    return info.frames / info.samplerate


def read_audio(src: str | Path | bytes | ParquetAudio | np.ndarray, name: str = "") -> np.ndarray:
    """(S,) float32 mono waveform at 16 kHz. An array is taken to be 16 kHz mono already."""
    if isinstance(src, np.ndarray):
        return src.astype(np.float32, copy=False)
    if _missing(src):
        raise AudioError(f"{describe(src, name)}: audio file not found")
    f = _open(src)
    try:
        channels, sr = sf.read(f, dtype="float32", always_2d=True)  # (S, channels)
    except Exception as e:
        raise AudioError(f"{describe(src, name)}: unreadable audio ({e})") from None
    if channels.shape[0] == 0:
        raise AudioError(f"{describe(src, name)}: empty audio")
    wave_S = channels.mean(axis=1)
    if sr != SAMPLE_RATE:
        wave_S = resample(wave_S, sr).numpy()
    if wave_S.shape[0] < MIN_SAMPLES:
        raise AudioError(too_short(describe(src, name), wave_S.shape[0] / SAMPLE_RATE))
    return np.ascontiguousarray(wave_S, dtype=np.float32)


def too_short(what: str, seconds: float) -> str:
    return (f"{what}: a clip of {1000 * seconds:.1f} ms is shorter than the feature extractor's "
            f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms minimum")
