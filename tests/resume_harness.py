"""Kill-and-resume harness for any training command that resumes from its latest checkpoint.

`run_killed_then_resumed(cmd, ckpt_dir, kill_after_step)` starts `cmd`, SIGKILLs it once a
checkpoint of at least `kill_after_step` exists (mid-run, between or during later steps), then runs
`cmd` again to the end. Compare `losses_by_step(log)` with an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from grpo_speech.checkpoint import latest_checkpoint


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_to_end(cmd: list[str], timeout: float = 120.0) -> None:
    subprocess.run(cmd, check=True, timeout=timeout, env=_env())


def run_killed_then_resumed(cmd: list[str], ckpt_dir: str | Path, kill_after_step: int,
                            timeout: float = 120.0) -> int:
    """Returns the step of the checkpoint that was on disk when the kill landed."""
    proc = subprocess.Popen(cmd, env=_env())
    deadline = time.monotonic() + timeout
    try:
        while True:
            ckpt = latest_checkpoint(ckpt_dir)
            if ckpt is not None and int(ckpt.name.split("_")[1]) >= kill_after_step:
                break
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} finished (rc {proc.returncode}) before a checkpoint of "
                                     f"step >= {kill_after_step} appeared: nothing was killed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no checkpoint of step >= {kill_after_step} in {ckpt_dir} after {timeout} s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = int(ckpt.name.split("_")[1])
    run_to_end(cmd, timeout)
    return killed_at


def losses_by_step(log: str | Path) -> dict[int, float]:
    """Loss per step from a JSONL log; a step logged again after a resume overrides the first."""
    out: dict[int, float] = {}
    for line in Path(log).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out
