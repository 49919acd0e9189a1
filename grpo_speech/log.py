"""The step record: raw sums in, one namespaced dict out; where it goes; rollout dumps.

`step_record` is the only place metric arithmetic happens: the loss and the loop hand it sums and
counts (already summed over micro-batches, passes and ranks) and it divides once. `Logger` writes
each record to metrics.jsonl and, when those packages are installed and asked for, TensorBoard and
W&B (offline); on ranks other than 0 it does nothing, so the loop never branches on it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from grpo_speech.config import UserError

def rollout_counts(rewards_PG: torch.Tensor, lens_B: torch.Tensor, *, max_new_tokens: int,
                   skipped_rows: int, reference_column: bool) -> dict[str, float]:
    """The rollout's raw sums of one rank: rewards (P, G) of its real prompts, completion lengths
    (B,) of their rows, and with MP-GRPO (`reference_column`) the reward of the reference answer,
    the last sample of each group."""
    P = rewards_PG.shape[0]
    ref_P = rewards_PG[:, -1] if reference_column else rewards_PG.new_zeros(0)
    return {
        "reward_sum": float(rewards_PG.sum()),
        "reward_sq": float((rewards_PG ** 2).sum()),
        "reward_n": float(rewards_PG.numel()),
        "reference_reward_sum": float(ref_P.sum()),
        "reference_reward_n": float(ref_P.numel()),
        "len_sum": float(lens_B.sum()),
        "len_n": float(lens_B.numel()),
        "truncated": float((lens_B >= max_new_tokens).sum()),
        "zero_std_groups": float(zero_std_groups(rewards_PG)),
        "groups": float(P),
        "skipped_rows": float(skipped_rows),
    }


def zero_std_groups(rewards_PG: torch.Tensor) -> int:
    """Groups whose G rewards are all equal (zero advantage, no learning signal)."""
    if rewards_PG.shape[1] < 2:
        return 0
    return int((rewards_PG == rewards_PG[:, :1]).all(dim=1).sum())


def step_record(tot: dict[str, float], *, step: int, method: str, lr: float, grad_norm: float,
                skipped: bool, times: dict[str, float]) -> dict:
    """The logged dict of one optimiser step from summed raw counts.

    tot: the loss metrics (policy_loss / sft_loss), "loss_sum" (the loss times the token count) and
    the keys of `rollout_counts`, each summed over micro-batches, the `num_iterations` passes and
    the ranks. Loss, clip and ratio means divide a sum over passes by a token count summed over the
    same passes, so they are per-pass means with no further division. A count of 0 gives 0, never
    NaN. times: seconds per phase, logged as time/<name>.
    """
    def div(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    n = tot.get("tokens", 0.0)
    record = {
        "step": step,
        "loss/total": div(tot.get("loss_sum", 0.0), n),
        "optim/lr": lr,
        "optim/grad_norm": grad_norm,
        "optim/skipped": int(skipped),
        "data/skipped_rows": int(tot["skipped_rows"]),
        "rollout/len_mean": div(tot["len_sum"], tot["len_n"]),
        "rollout/truncated_frac": div(tot["truncated"], tot["len_n"]),
        **{f"time/{k}": v for k, v in times.items()},
    }
    if method == "sft":
        record["loss/nll"] = div(tot["nll_sum"], n)
        return record
    on = tot["on_policy_tokens"]
    r_mean = div(tot["reward_sum"], tot["reward_n"])
    record.update({
        "loss/pg": -div(tot["pg_sum"], n),
        "loss/kl": div(tot["kl_sum"], n),
        "reward/mean": r_mean,
        "reward/std": math.sqrt(max(0.0, div(tot["reward_sq"], tot["reward_n"]) - r_mean ** 2)),
        "adv/zero_std_frac": div(tot["zero_std_groups"], tot["groups"]),
        "clip/low_frac": div(tot["clip_low_count"], on),
        "clip/high_frac": div(tot["clip_high_count"], on),
        "clip/frac": div(tot["clip_low_count"] + tot["clip_high_count"], on),
        "ratio/mean": div(tot["ratio_sum"], on),
    })
    if method == "mpgrpo":
        record["reward/reference_mean"] = div(tot["reference_reward_sum"], tot["reference_reward_n"])
        # The policy's mean probability of the correct answers' tokens: LUFFY's off-policy term
        # exp(logp) * A pushes it up; near 1 the reference rows have nothing left to teach.
        record["mpgrpo/off_policy_prob"] = div(tot.get("off_policy_prob_sum", 0.0),
                                                 tot.get("off_policy_tokens", 0.0))
    return record


def summary(record: dict) -> str:
    """The one-line console summary of a step record."""
    keys = ["loss/total", "reward/mean", "loss/kl", "clip/frac", "rollout/len_mean", "optim/grad_norm"]
    return " ".join(f"{k.split('/')[-1]}={record[k]:.3g}" for k in keys if k in record)


def truncate_log(path: Path, step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint: the resumed run rewrites them.
    A last line torn by a kill, a full disk or a power loss (not JSON) is dropped with a warning
    naming the file; a torn line anywhere else is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                print(f"warning: {path} line {number}: a torn last record (not JSON), dropped on resume",
                      file=sys.stderr, flush=True)
                continue
            raise UserError(f"{path} line {number}: not a JSON record (the log is damaged before its "
                            "last line; move the file away to resume without it)") from None
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def dump_rollouts(run_dir: Path, step: int, batch: dict, texts: list[str], rewards_PG, G: int,
                  n_prompts: int = 2) -> None:
    """A few prompts' G completions with their rewards, as text: rollouts/step_NNNNNN.txt."""
    out = run_dir / "rollouts"
    out.mkdir(exist_ok=True)
    lines = []
    for p in range(min(n_prompts, rewards_PG.shape[0])):
        lines.append(f"### {batch['ids'][p]}\nreference: {batch['references'][p]}")
        for g in range(G):
            lines.append(f"  [{float(rewards_PG[p, g]):.3f}] {texts[p * G + g]}")
    (out / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n")


class Logger:
    """Where step records go. The default, Logger(), does nothing. Logger.open(...) on rank 0
    writes metrics.jsonl and, every `console_every` steps, calls `console` with the summary line;
    `tensorboard` and `wandb` add those sinks when the package is installed (a note otherwise)."""

    def __init__(self, *, jsonl: Path | None = None, console=None, console_every: int = 1,
                 sinks: tuple = ()):
        self.jsonl, self.console, self.console_every, self.sinks = jsonl, console, console_every, sinks

    @classmethod
    def open(cls, run_dir: Path, *, is_main: bool, console=None, console_every: int = 1,
             tensorboard: bool = False, wandb: bool = False, name: str = "") -> Logger:
        if not is_main:
            return cls()
        sinks = []
        if tensorboard:
            sinks += _optional("tensorboard", lambda: _TensorBoard(run_dir / "tensorboard"))
        if wandb:
            sinks += _optional("wandb", lambda: _WandB(run_dir, name))
        return cls(jsonl=run_dir / "metrics.jsonl", console=console, console_every=console_every,
                   sinks=tuple(sinks))

    def log(self, record: dict) -> None:
        """Append one record (it has a "step"); the console gets training steps only."""
        if self.jsonl is not None:
            try:
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: name the file (the CLI prints one line)
                raise OSError(e.errno, e.strerror, str(self.jsonl)) from None
        if self.console is not None and "loss/total" in record and record["step"] % self.console_every == 0:
            self.console(summary(record))
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _optional(package: str, make) -> list:
    try:
        return [make()]
    except ImportError:
        print(f"note: {package} is not installed; logging to metrics.jsonl only", flush=True)
        return []


class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict) -> None:
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, name: str):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_dir), name=name or run_dir.name)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()
