"""Runs on a cluster: a signal stops every rank after its step with a checkpoint and exit code 75,
and the resumed run continues bit for bit; runs that cannot learn are named; a step that turns
non-finite is never applied, and the stop is one line naming the step and the quantity.

    .venv/bin/python -m pytest -q tests/test_cluster.py                # fast ones
    .venv/bin/python -m pytest -q -m cluster tests/test_cluster.py     # multi-rank signal runs
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_speech.config import load_config
from grpo_speech.train import EXIT_REQUEUE, NonFiniteError, train
from tiny_run import make_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model (own BPE tokenizer) and an 8/2/2-clip synthetic ast dataset."""
    root = tmp_path_factory.mktemp("cluster")
    make_tiny_run(root, 8)
    return root


def overrides(root: Path, run: str, **extra) -> list[str]:
    base = {
        "method": "grpo", "task": "ast", "model.path": str(root / "base"), "data.dir": str(root / "data"),
        "data.n_train": 8, "data.n_val": 2, "data.n_test": 2, "run.evaluate": "false",
        "run.dir": str(root / run), "train.max_steps": 3, "train.prompts_per_step": 4,
        "train.micro_batch_size": 4, "train.save_every": 100, "grpo.group_size": 3,
        "grpo.max_new_tokens": 6, "train.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_step_that_turns_non_finite_is_not_applied_and_the_stop_is_one_line(setup, monkeypatch):
    # Fault injection: the policy's log-probs (with gradient) come back NaN.
    import grpo_speech.train as train_module
    real = train_module.micro_batch_logprobs

    def nan_policy(net, rows_B, **kw):
        lp = real(net, rows_B, **kw)
        return lp * float("nan") if torch.is_grad_enabled() else lp

    monkeypatch.setattr(train_module, "micro_batch_logprobs", nan_policy)
    cfg = load_config(None, overrides(setup, "nan_run", **{"train.max_bad_steps": 2}))
    with pytest.raises(NonFiniteError, match=r"^step 2: non-finite log-probs in 2 steps in a row, never "
                                             r"applied or saved; stopping\. .*lower train\.lr"):
        train(cfg)
    got = records(setup / "nan_run")
    assert [r["optim/skipped"] for r in got if "optim/skipped" in r] == [1, 1]


def test_a_run_that_cannot_learn_is_flagged(setup, capsys):
    # All-equal rewards in every group (a reward that scores every text 0.5) give zero advantages.
    import grpo_speech.train as train_module
    cfg = load_config(None, overrides(setup, "flat_run", **{"train.stall_steps": 2}))
    real = train_module.get_reward
    train_module.get_reward = lambda *a, **k: (lambda texts, refs: torch.full((len(texts),), 0.5))
    try:
        train(cfg)
    finally:
        train_module.get_reward = real
    got = [r for r in records(setup / "flat_run") if "loss/total" in r]
    assert [r.get("warn/stalled", 0) for r in got] == [0, 1, 1]
    assert "for 2 steps in a row every advantage was 0" in capsys.readouterr().out


def _launch(setup, run, ranks, *extra):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launcher, "-m", "grpo_speech", "train",
           *overrides(setup, run, **{"train.max_steps": 6, "run.resume": "auto"}), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.cluster
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_signal_stops_every_rank_with_a_checkpoint_and_the_requeued_run_continues_exactly(setup, ranks):
    whole = _launch(setup, f"whole_{ranks}", ranks)
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    want = {r["step"]: r["loss/total"] for r in records(setup / f"whole_{ranks}") if "loss/total" in r}

    run = setup / f"signalled_{ranks}"
    job = _launch(setup, f"signalled_{ranks}", ranks)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and any("loss/total" in r for r in records(run))):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    out, err = job.communicate(timeout=300)
    stopped = [r["step"] for r in records(run) if "loss/total" in r]
    # One process exits with 75; torchrun, signalled too, reports the signal itself and exits non-zero.
    assert job.returncode == (EXIT_REQUEUE if ranks == 1 else 1), (job.returncode, err[-3000:])
    assert f"exit code {EXIT_REQUEUE}" in out and "stopping after this step with a checkpoint" in err
    assert ranks > 1 or "Traceback" not in err
    assert (run / "checkpoints" / f"step_{stopped[-1]:06d}").is_dir() and stopped[-1] < 6
    assert json.loads((run / "stopped.json").read_text()) == {"step": stopped[-1], "exit_code": EXIT_REQUEUE}

    again = _launch(setup, f"signalled_{ranks}", ranks)  # the same command line, requeued
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    got = {r["step"]: r["loss/total"] for r in records(run) if "loss/total" in r}
    assert got == want  # bit for bit
    assert not (run / "stopped.json").exists()


@pytest.mark.cluster
def test_one_process_and_two_ranks_sample_and_score_alike(tmp_path):
    # The default tiny ast config with sampling on (temperature 1 in training, 0.9 / top-p 0.9 at
    # evaluation), its P = 8, G = 8 and lengths: every prompt's wording, every row's sampling noise
    # and the evaluation batches are keyed by their place in the step or the split, not by rank.
    common = ["--config", "experiments/tiny/ast_grpo.yaml", f"data.dir={tmp_path / 'data'}", "data.n_train=32",
              "data.n_val=4", "data.n_test=12", "train.max_steps=2", "train.eval_every=2", "train.rollouts_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node=2"])):
        out = subprocess.run([sys.executable, *launcher, "-m", "grpo_speech", "train", *common,
                              f"run.dir={tmp_path / name}"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = tmp_path / name
    for step in (1, 2):  # the step's first prompt (rank 0's first on 2 ranks): the same G completions
        texts = [(runs[n] / "rollouts" / f"step_{step:06d}.txt").read_text().split("### ")[1] for n in ("one", "two")]
        assert texts[0] == texts[1]
    one, two = ({r["step"]: r for r in records(runs[n]) if "loss/total" in r} for n in ("one", "two"))
    for step in (1, 2):
        assert two[step]["reward/mean"] == pytest.approx(one[step]["reward/mean"], rel=1e-6)  # sums over ranks
        assert two[step]["loss/total"] == pytest.approx(one[step]["loss/total"], rel=1e-4, abs=1e-6)
        assert two[step]["optim/grad_norm"] == pytest.approx(one[step]["optim/grad_norm"], rel=1e-4)
    results = [json.loads((runs[n] / "results.json").read_text())["results"] for n in ("one", "two")]
    assert results[0]["grpo"]["bleu"] == pytest.approx(results[1]["grpo"]["bleu"], abs=1e-9)
    assert results[0]["base"] == results[1]["base"]
