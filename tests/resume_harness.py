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


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _assert_gone(pids: list[int], timeout: float) -> None:
    """A killed trainer's batch workers must end too (an orphan would hold its memory forever)."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.2)
    assert not alive, f"batch workers {alive} outlived their killed trainer by {timeout:.0f} s"


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
        workers = _children(proc.pid)  # the batch workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_gone(workers, 15.0)
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
