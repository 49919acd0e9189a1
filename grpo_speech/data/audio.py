"""Audio I/O for every data source: read FLAC/WAV/MP3 with soundfile, down-mix to mono, resample
to 16 kHz with torchaudio. An audio source is a file path or the encoded bytes of a file (the
parquet layout of CoVoST 2 embeds them). Errors name the file.
"""
from __future__ import annotations

import io
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
    """Resample a (..., T) waveform. The filter bank of each rate pair is built once and cached:
    building it dominated the cost of short clips."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if orig_sr == new_sr:
        return wave
    key = (orig_sr, new_sr)
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = torchaudio.transforms.Resample(orig_sr, new_sr)
    with torch.no_grad():
        return _RESAMPLERS[key](wave)


def _open(src: str | Path | bytes):
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src)


def describe(src: str | Path | bytes, name: str = "") -> str:
    return name or (f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else str(src))


def audio_seconds(src: str | Path | bytes, name: str = "") -> float:
    """Duration from the file header (cheap); raises AudioError for a missing or unreadable file."""
    if not isinstance(src, (bytes, bytearray)) and not Path(src).is_file():
        raise AudioError(f"{describe(src, name)}: audio file not found")
    try:
        info = sf.info(_open(src))
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        raise AudioError(f"{describe(src, name)}: unreadable audio ({e})") from None
    if info.samplerate <= 0:
        raise AudioError(f"{describe(src, name)}: unreadable audio (sample rate {info.samplerate})")
    return info.frames / info.samplerate


def read_audio(src: str | Path | bytes | np.ndarray, name: str = "") -> np.ndarray:
    """(T,) float32 mono waveform at 16 kHz. An array is taken to be 16 kHz mono already."""
    if isinstance(src, np.ndarray):
        return src.astype(np.float32, copy=False)
    if not isinstance(src, (bytes, bytearray)) and not Path(src).is_file():
        raise AudioError(f"{describe(src, name)}: audio file not found")
    try:
        wave_TC, sr = sf.read(_open(src), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{describe(src, name)}: unreadable audio ({e})") from None
    if wave_TC.shape[0] == 0:
        raise AudioError(f"{describe(src, name)}: empty audio")
    wave_T = wave_TC.mean(axis=1)
    if sr != SAMPLE_RATE:
        wave_T = resample(wave_T, sr).numpy()
    if wave_T.shape[0] < MIN_SAMPLES:
        raise AudioError(too_short(describe(src, name), wave_T.shape[0] / SAMPLE_RATE))
    return np.ascontiguousarray(wave_T, dtype=np.float32)


def too_short(what: str, seconds: float) -> str:
    return (f"{what}: a clip of {1000 * seconds:.1f} ms is shorter than the feature extractor's "
            f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms minimum")
