"""The small world the end-to-end tests train in: a random tiny Granite Speech with its own BPE
tokenizer, saved as a model directory, and a few synthetic ast clips."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_run(root: Path, n_train: int):
    """(processor) after writing root/base (the model) and root/data (n_train/2/2 ast clips)."""
    from grpo_speech.data.synth import synthesize, text_corpus
    from grpo_speech.model import build_tiny_model, build_tokenizer, save_model

    torch.manual_seed(0)
    tok = build_tokenizer(text_corpus("ast", 300, 0), 400)
    model, processor = build_tiny_model(tok, enc_layers=1, lm_layers=1, dropout=0.0)
    save_model(model, processor, root / "base")
    synthesize("ast", str(root / "data"), n_train, 2, 2, 0)
    return processor
