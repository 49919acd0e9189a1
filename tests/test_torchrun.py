"""The real CLI under torchrun on 2 CPU ranks (gloo): the path of a 4-GPU run, end to end.

    .venv/bin/python -m pytest -q tests/test_torchrun.py      # about a minute on 2 cores

The tiny base samples at temperature 1, so the ranks' rows end at different steps, and the
validation and test splits have an odd size, so one rank's evaluation shard is one example
longer: both used to leave the ranks with different numbers of FSDP collectives ("Received data
size doesn't match expected size" on gloo, a hang on NCCL). The run trains a LoRA (rank 8) on 2
ranks, checkpoints it, keeps best/, scores it on the test split, then resumes for one more step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], timeout: float = 600.0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "grpo_speech", *args]
    # own session: a hung run is killed with its worker processes, not just the launcher
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{cmd} failed with rc {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    common = ["--config", "experiments/tiny/ast_grpo.yaml", f"data.dir={root / 'data'}", "data.n_train=24",
              "data.n_val=5", "data.n_test=5", "eval.batch_size=2",
              "train.prompts_per_step=4", "grpo.group_size=4",
              "model.train=lora", "model.lora_rank=8", "train.eval_every=3", "train.save_every=3"]
    out = _torchrun(["train", *common, f"run.dir={root / 'run'}", "train.max_steps=3"])
    return root, common, out


def test_three_steps_with_validation_and_test_on_two_ranks(run):
    root, _, out = run
    assert "2 rank(s)" in out
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/bleu" in r] == [0, 3]
    steps = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # the rows really ended at different lengths (the case that desynchronised the ranks)
    assert any(0 < r["rollout/truncated_frac"] < 1 or r["rollout/len_mean"] < 48 for r in steps)
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["test_examples"] == 5 and set(results["results"]) == {"base", "grpo"}
    # best/ holds the base and the LoRA apart, and reloads (the test scores above came from it)
    assert (root / "run" / "best" / "adapter_config.json").is_file()
    assert (root / "run" / "checkpoints" / "step_000003").is_dir()


def test_resume_on_two_ranks_continues_from_the_lora_checkpoint(run):
    root, common, _ = run
    out = _torchrun(["train", "--resume", str(root / "run"), *common, "train.max_steps=4"])
    assert "at step 3" in out
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3, 4]
