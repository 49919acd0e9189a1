"""The step record and its sinks: one pure reduction of raw sums (hand-derived numbers, two passes
included), 0 / 0 -> 0, the JSONL and console sinks, and the do-nothing default.

    .venv/bin/python -m pytest -q tests/test_log.py
"""
from __future__ import annotations

import json

import pytest
import torch

from grpo_speech.log import Logger, rollout_counts, step_record, truncate_log


def test_step_record_divides_once_over_passes():
    # Two passes over 4 on-policy tokens each, summed: tokens 8. Pass losses 0.15 and 0.10 give
    # loss_sum 0.15*4 + 0.10*4 = 1.0 -> loss/total 1.0 / 8 = 0.125 (the mean of the passes).
    # One low clip per pass: 2 / 8 = 0.25. Ratios sum to 4.0 and 4.4: ratio/mean 8.4 / 8 = 1.05.
    # Dividing again by the pass count would give 0.0625, 0.125 and 0.525.
    tot = {"tokens": 8.0, "on_policy_tokens": 8.0, "loss_sum": 1.0, "pg_sum": -0.8, "kl_sum": 0.4,
           "clip_low_count": 2.0, "clip_high_count": 0.0, "ratio_sum": 8.4,
           # Rewards of 2 prompts x G=2 on one rank and 1 x 2 on another: [1, 0], [1, 1] | [0, 0].
           "reward_sum": 3.0, "reward_sq": 3.0, "reward_n": 6.0,
           "reference_reward_sum": 1.0, "reference_reward_n": 3.0,  # last column: 0, 1, 0
           "len_sum": 30.0, "len_n": 6.0, "truncated": 3.0, "zero_std_groups": 2.0, "groups": 3.0,
           "skipped_rows": 1.0}
    r = step_record(tot, step=5, method="mpgrpo", lr=1e-3, grad_norm=0.5, skipped=False,
                    times={"rollout": 2.0})
    assert r["step"] == 5 and r["optim/lr"] == 1e-3 and r["time/rollout"] == 2.0
    assert r["loss/total"] == pytest.approx(0.125, abs=1e-12)
    assert r["loss/pg"] == pytest.approx(0.1, abs=1e-12) and r["loss/kl"] == pytest.approx(0.05, abs=1e-12)
    assert r["clip/low_frac"] == 0.25 and r["clip/frac"] == 0.25 and r["clip/high_frac"] == 0.0
    assert r["ratio/mean"] == pytest.approx(1.05, abs=1e-12)
    # mean 3/6 = 0.5; E[r^2] = 0.5, so std = sqrt(0.5 - 0.25) = 0.5 (population std).
    assert r["reward/mean"] == 0.5 and r["reward/std"] == pytest.approx(0.5, abs=1e-12)
    assert r["reward/reference_mean"] == pytest.approx(1 / 3, abs=1e-12)
    assert r["adv/zero_std_frac"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["rollout/len_mean"] == 5.0 and r["rollout/truncated_frac"] == 0.5
    assert r["data/skipped_rows"] == 1 and r["optim/skipped"] == 0


def test_mpgrpo_records_the_policys_probability_of_the_reference_tokens():
    # Two reference rows of 2 tokens each with probabilities (0.25, 0.5) and (0.5, 0.75), one pass:
    # off_policy_prob_sum = 2.0 over 4 tokens -> 0.5. GRPO has no reference rows: no such key.
    tot = {"tokens": 12.0, "on_policy_tokens": 8.0, "off_policy_tokens": 4.0, "off_policy_prob_sum": 2.0,
           "loss_sum": 0.0, "pg_sum": 0.0, "kl_sum": 0.0, "clip_low_count": 0.0, "clip_high_count": 0.0,
           "ratio_sum": 8.0, **rollout_counts(torch.ones(2, 4), torch.ones(8), max_new_tokens=8,
                                              skipped_rows=0, reference_column=True)}
    r = step_record(tot, step=1, method="mpgrpo", lr=0.0, grad_norm=0.0, skipped=False, times={})
    assert r["mpgrpo/off_policy_prob"] == 0.5
    assert "mpgrpo/off_policy_prob" not in step_record(tot, step=1, method="grpo", lr=0.0, grad_norm=0.0,
                                                       skipped=False, times={})


def test_step_record_of_nothing_is_zero_not_nan():
    zeros = dict.fromkeys(["tokens", "on_policy_tokens", "loss_sum", "pg_sum", "kl_sum", "clip_low_count",
                           "clip_high_count", "ratio_sum", "nll_sum"], 0.0)
    counts = rollout_counts(torch.zeros(0, 3), torch.zeros(0), max_new_tokens=8, skipped_rows=2,
                            reference_column=True)
    for method in ("grpo", "mpgrpo", "sft"):
        r = step_record({**zeros, **counts}, step=1, method=method, lr=0.0, grad_norm=0.0, skipped=True, times={})
        assert all(v == 0 for k, v in r.items() if k not in ("step", "data/skipped_rows", "optim/skipped"))


def test_rollout_counts_hand_values():
    # Prompt 0: rewards [1, 1] (zero std); prompt 1: [0, 2]. Lengths 3, 8, 8, 1 with a cap of 8.
    c = rollout_counts(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([3.0, 8.0, 8.0, 1.0]),
                       max_new_tokens=8, skipped_rows=0, reference_column=True)
    assert c["reward_sum"] == 4 and c["reward_sq"] == 6 and c["reward_n"] == 4
    assert c["reference_reward_sum"] == 3 and c["reference_reward_n"] == 2
    assert c["len_sum"] == 20 and c["len_n"] == 4 and c["truncated"] == 2
    assert c["zero_std_groups"] == 1 and c["groups"] == 2
    plain = rollout_counts(torch.ones(2, 2), torch.ones(4), max_new_tokens=8, skipped_rows=0,
                           reference_column=False)
    assert plain["reference_reward_n"] == 0 and plain.keys() == c.keys()  # same keys on every rank


def test_default_logger_does_nothing_and_open_writes_jsonl_and_console(tmp_path):
    Logger().log({"step": 1, "loss/total": 1.0})  # no file, no output, no error
    Logger().close()
    assert list(tmp_path.iterdir()) == []

    lines = []
    log = Logger.open(tmp_path, is_main=True, console=lines.append, console_every=2)
    log.log({"step": 0, "val/bleu": 3.0})
    log.log({"step": 1, "loss/total": 0.5, "reward/mean": 0.25})
    log.log({"step": 2, "loss/total": 0.125, "reward/mean": 0.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert lines == ["total=0.125 mean=0.5"]  # every 2nd training step; validation records not

    assert Logger.open(tmp_path / "elsewhere", is_main=False).jsonl is None  # other ranks: nothing


def test_missing_optional_sinks_are_a_note_not_an_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_sinks(name, *args, **kwargs):
        if name in ("wandb", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sinks)
    log = Logger.open(tmp_path, is_main=True, tensorboard=True, wandb=True)
    assert log.sinks == ()
    assert "tensorboard is not installed" in capsys.readouterr().out
    log.log({"step": 1, "loss/total": 0.0})
    assert (tmp_path / "metrics.jsonl").exists()


def test_truncate_log_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3)))
    truncate_log(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_truncate_log_drops_a_torn_last_record_with_a_warning(tmp_path, capsys):
    # A disk-full or a power loss in the middle of an append leaves half a record at the end.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2)) + '{"step": 3, "loss/to')
    truncate_log(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert f"{path} line 4: a torn last record" in capsys.readouterr().err
    # Damage before the last line is not a torn append: named, not silently dropped.
    from grpo_speech.config import UserError
    path.write_text('{"step": 0}\n{"st\n{"step": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        truncate_log(path, 5)
