"""Toy training run for the checkpoint tests: resume from the latest checkpoint, train, log.

    python tests/ckpt_worker.py --ckpt-dir D --log L --steps 12 --save-every 4 [--step-sleep 0.1]

Every source of randomness a real run has is used: dropout and data noise (torch), batch order
(numpy permutation per epoch), a random input mask rate (python `random`); the data position is
carried in the checkpoint's `extra`. Each step appends {"step", "loss", "lr"} to the JSONL log.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_speech.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    # Fixed seed for everything; a resumed run then overwrites the generator states from the checkpoint.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1),
    )
    data_x_NI = torch.randn(40, 8)
    data_y_N = data_x_NI.sum(dim=1, keepdim=True).tanh()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    batch = 8

    step, epoch, pos, order = 0, 0, 0, np.random.permutation(len(data_x_NI))
    ckpt = latest_checkpoint(args.ckpt_dir)
    if ckpt is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        step, epoch, pos, order = extra["step"], extra["epoch"], extra["pos"], np.array(extra["order"])
        with open(args.log, "a") as f:
            f.write(json.dumps({"event": "resume", "step": step}) + "\n")

    while step < args.steps:
        if pos + batch > len(order):  # new epoch: reshuffle with numpy's global generator
            epoch, pos, order = epoch + 1, 0, np.random.permutation(len(data_x_NI))
        idx = order[pos:pos + batch]
        pos += batch
        x_BI = data_x_NI[idx] + 0.1 * torch.randn(batch, 8)
        x_BI = x_BI * (torch.rand(batch, 8) > random.uniform(0.0, 0.3))
        loss = torch.nn.functional.mse_loss(model(x_BI), data_y_N[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        with open(args.log, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}) + "\n")
        if step % args.save_every == 0:
            save_checkpoint(args.ckpt_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                            extra={"epoch": epoch, "pos": pos, "order": order.tolist()})
        time.sleep(args.step_sleep)


if __name__ == "__main__":
    main()
