"""The command line: a user's mistake prints one `error:` line and exits 2 (no traceback); help
and argument checks of each command; the Makefile's train target.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_speech.checkpoint import save_checkpoint
from grpo_speech.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "'grpo.group_size' = 1" in one_error_line(capsys, ["train", "grpo.group_size=1"])
    assert "nope.yaml" in one_error_line(capsys, ["train", "--config", "nope.yaml"])
    assert "unknown config key 'grpo.betta'" in one_error_line(capsys, ["eval", "grpo.betta=1"])
    (tmp_path / "hyp.txt").write_text("a\nb\n")
    (tmp_path / "ref.txt").write_text("a\n")
    assert "line counts differ" in one_error_line(
        capsys, ["score", "--hyp", "hyp.txt", "--ref", "ref.txt"])
    assert "missing.txt" in one_error_line(capsys, ["score", "--hyp", "missing.txt", "--ref", "ref.txt"])


def test_resume_of_a_mistyped_directory_starts_nothing(tmp_path, capsys, monkeypatch):
    # It used to start a fresh run with the defaults and synthesize data into ./data.
    monkeypatch.chdir(tmp_path)
    err = one_error_line(capsys, ["train", "--resume", "runs/ats_grpo"])
    assert "runs/ats_grpo/config.yaml" in err
    assert list(tmp_path.iterdir()) == []


def test_fresh_train_in_a_run_dir_with_checkpoints_exits_2(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path / "run" / "checkpoints", step=3, model=model, optimizer=opt,
                    scheduler=sched, extra={})
    err = one_error_line(capsys, ["train", "run.dir=run"])
    assert "holds the checkpoints of an earlier run" in err and "run.overwrite=true" in err


def test_eval_of_a_missing_model_directory_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = one_error_line(capsys, ["eval", f"model.path={tmp_path / 'runs/ast_grpo/best'}"])
    assert "directory not found" in err and "hub" not in err
    # Shaped like a hub id, offline and not cached: still "directory not found".
    assert "directory not found" in one_error_line(capsys, ["eval", "model.path=runs/best"])


def test_argument_checks_of_each_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "logprobs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--resume", "runs/x"])  # eval continues nothing
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["score", "--hyp", "h", "--ref", "r", "--lang", "xx"])
    assert e.value.code == 2 and "invalid choice: 'xx' (choose from 'en', 'de')" in capsys.readouterr().err


def test_make_train_names_the_tasks_it_has_and_starts_over():
    bad = subprocess.run(["make", "-n", "train", "TASK=asr"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no experiments/tiny/asr_grpo.yaml: TASK is ast or sqa" in bad.stderr
    ok = subprocess.run(["make", "-n", "train", "TASK=ast"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "run.dir=runs/ast_grpo run.overwrite=true" in ok.stdout


def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path):
    # No HF_HUB_OFFLINE and a hub that does not answer: one line within seconds, not minutes of
    # retries and a long traceback.
    import time
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "grpo_speech", "train", "model.path=some-org/some-model",
                          f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and time.monotonic() - t0 < 60
    assert out.stderr.strip().splitlines() == [
        "error: model.path 'some-org/some-model': directory not found (nor in the local hub cache, and the "
        "hub is unreachable)"]


def test_a_bad_override_is_named_as_the_override(tmp_path):
    from grpo_speech.config import ConfigError, load_config
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("grpo:\n  beta: 0.02\n")
    with pytest.raises(ConfigError, match=r"^config key 'grpo.beta' = -1.*\(the command-line override 'grpo.beta=-1'\)$"):
        load_config(yaml_file, ["grpo.beta=-1"])
    yaml_file.write_text("grpo:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=rf"^{yaml_file}: config key 'grpo.beta'"):
        load_config(yaml_file, [])


def test_a_full_disk_is_one_line_naming_the_file(capsys, monkeypatch):
    # /dev/full answers every write with ENOSPC, as a full disk does.
    from grpo_speech import cli
    from grpo_speech.log import Logger

    def full(argv):
        Logger(jsonl=Path("/dev/full")).log({"step": 1})

    monkeypatch.setattr(cli, "_main", full)
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no space left on the device writing /dev/full: free some space (or move run.dir) and resume; "
        "the newest complete checkpoint is intact")
