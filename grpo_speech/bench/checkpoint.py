"""Checkpoint size and save time of a LoRA run on the Granite-Speech-2B shape (r=64 on q/v).

    python -m grpo_speech bench checkpoint

The base weights are allocated without being initialised (their values do not change what an
adapter-sized checkpoint writes); the LoRA gets one AdamW step so that both moments exist. Prints
the checkpoint's bytes against 3x the LoRA's fp32 bytes (parameters and two moments) and against
the full model's fp32 bytes, and the save time.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import GraniteSpeechForConditionalGeneration

from grpo_speech.checkpoint import save_checkpoint
from grpo_speech.model import AUDIO_TOKEN, GRANITE_2B_SIZES, set_trainable, tiny_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="grpo-speech bench checkpoint")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (the released speech LoRA: 64)")
    p.add_argument("--out", default="", help="directory to write into (default: a temporary one)")
    args = p.parse_args(argv)
    config = tiny_config(49160, 49159, **GRANITE_2B_SIZES)
    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config)
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank // 2, target_modules=["q_proj", "v_proj"],
                                 lora_dropout=0.0))
    model.to_empty(device="cpu")
    model._hf_peft_config_loaded = True
    set_trainable(model, "lora")
    params = [q for q in model.parameters() if q.requires_grad]
    with torch.no_grad():
        for q in params:
            q.normal_(0, 0.01)
            q.grad = torch.randn_like(q) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    total = sum(q.numel() for q in model.parameters())
    lora = sum(q.numel() for q in params)
    root = Path(args.out or tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        t0 = time.perf_counter()
        path = save_checkpoint(root / "checkpoints", step=1, model=model, optimizer=optimizer,
                               scheduler=scheduler, extra={"step": 1})
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir())
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Granite-Speech-2B shape ({AUDIO_TOKEN} id 49159), LoRA r={args.rank} on q/v: "
          f"{total / 1e9:.3f} B parameters, {lora / 1e6:.2f} M trainable")
    print(f"checkpoint {size / 2**20:.1f} MiB in {seconds:.2f} s; "
          f"{size / (3 * 4 * lora):.3f} x (LoRA fp32 x 3 = {3 * 4 * lora / 2**20:.1f} MiB); "
          f"{size / (4 * total):.4f} x the full model's fp32 weights ({4 * total / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
