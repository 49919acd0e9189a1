"""Decoding in lock-step across ranks: two FSDP2 gloo ranks, one whose rows all end at the first
token and one whose rows run to max_new_tokens, sample what each would alone.

    .venv/bin/python -m pytest -q tests/test_rollout_lockstep.py

Without lock-step the ranks run different numbers of decode steps; under FSDP2 each step is a
collective, and gloo fails with "Received data size doesn't match expected size" (NCCL hangs).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = str(Path(__file__).parent / "rollout_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank torchrun of tests/rollout_worker.py (~15 s on 2 cores); both ranks' results."""
    out = tmp_path_factory.mktemp("lockstep")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # a hang is killed with its workers
    try:
        assert proc.wait(timeout=180) == 0, f"{cmd} failed with rc {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return json.loads((out / "result.json").read_text())


def test_ranks_that_end_apart_sample_what_they_would_alone(ranks):
    r0, r1 = ranks
    # The setup: rank 0's 2 rows stop at their first token, rank 1's 2 rows run all 12 steps.
    assert [sum(m) for m in r0["want"]["mask"]] == [1, 1]
    assert [sum(m) for m in r1["want"]["mask"]] == [12, 12]
    for r in (r0, r1):
        assert r["got"]["default"]["path"] == "static eager"  # the default on a CPU
        assert r["got"]["dynamic_per_layer"]["path"] == "dynamic"
        for name, got in r["got"].items():  # greedy: the same tokens, log-probs to fp32 noise
            assert got["ids"] == r["want"]["ids"] and got["mask"] == r["want"]["mask"], (r["rank"], name)
            diff = max(abs(a - b) for ra, rb in zip(got["logprobs"], r["want"]["logprobs"]) for a, b in zip(ra, rb))
            assert diff <= 1e-5, (r["rank"], name, diff)


def test_weights_are_sharded_again_after_the_rollout(ranks):
    for r in ranks:
        # Gathered for the rollout, then resharded with reshard-after-forward restored; the
        # sharded model's forward still equals the unsharded one's.
        assert r["restored"] and r["resharded"]
        assert r["forward_diff"] <= 1e-5
