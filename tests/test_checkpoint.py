"""Checkpoints: exact round trip, tied weights, atomic writes, no unpickling, real kill + resume;
fallback past a checkpoint that does not load, one run per run directory.

    .venv/bin/python -m pytest -q tests/test_checkpoint.py
"""
from __future__ import annotations

import json
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

from grpo_speech.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_latest_intact,
    prepare_run_dir,
    run_identity,
    save_checkpoint,
)
from grpo_speech.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from resume_harness import losses_by_step, run_killed_then_resumed, run_to_end  # noqa: E402


class TiedLM(torch.nn.Module):
    """Embedding tied to the output head (as Granite ties lm_head to embed_tokens), a frozen
    block, dropout and a buffer: everything a state dict can hold."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.block = torch.nn.Linear(6, 6)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        h_BTH = self.drop(torch.relu(self.block(self.frozen(self.embed(ids_BT)))))
        return self.head(h_BTH) * self.scale


def make(seed: int):
    torch.manual_seed(seed)
    model = TiedLM()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    return model, opt, sched


def train_step(model, opt, sched) -> float:
    ids_BT = torch.randint(0, 11, (4, 5))
    loss = torch.nn.functional.cross_entropy(model(ids_BT).flatten(0, 1), ids_BT.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_round_trip_restores_params_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = make(0)
    random.seed(1)
    np.random.seed(1)
    for _ in range(3):
        train_step(model, opt, sched)
    path = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, extra={"pos": 12})
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state.items()}
    expected_draws = draws()
    expected_loss = train_step(model, opt, sched)

    model2, opt2, sched2 = make(123)  # other weights, fresh optimizer, other RNG state
    random.seed(7)
    np.random.seed(7)
    extra = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert extra == {"pos": 12, "step": 3}
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved_params[k]), k
    assert model2.head.weight is model2.embed.weight  # the tie survives loading
    assert len(opt2.state) == 3  # trainable: embed.weight (= head.weight), block.weight, block.bias
    for p2, p in zip(opt2.param_groups[0]["params"], opt.param_groups[0]["params"]):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state[p2][name], saved_moments[p][name]), name
    # LambdaLR 0.5**s after 3 scheduler steps: lr = 1e-2 * 0.125
    assert sched2.get_last_lr() == [1e-2 * 0.125]
    assert opt2.param_groups[0]["lr"] == 1e-2 * 0.125
    assert draws() == expected_draws
    # the next step draws the same data and dropout mask and applies the same Adam update
    assert train_step(model2, opt2, sched2) == expected_loss


def test_next_step_after_load_is_bit_identical(tmp_path):
    model, opt, sched = make(0)
    for _ in range(2):
        train_step(model, opt, sched)
    path = save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra={})
    expected = [train_step(model, opt, sched) for _ in range(2)]
    model2, opt2, sched2 = make(5)
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert [train_step(model2, opt2, sched2) for _ in range(2)] == expected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_tied_weight_is_stored_once(tmp_path):
    model, opt, sched = make(0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={})
    with safetensors.safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    # state dict names: embed.weight, frozen.{weight,bias}, block.{weight,bias}, head.weight, scale;
    # head.weight is the same tensor as embed.weight, so 6 stored tensors and one alias.
    assert keys == {"embed.weight", "frozen.weight", "frozen.bias", "block.weight", "block.bias", "scale"}
    assert aliases == {"head.weight": "embed.weight"}


def test_torn_temp_dir_is_ignored_then_cleaned_and_old_ones_pruned(tmp_path):
    model, opt, sched = make(0)
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, scheduler=sched, extra={})
    # a writer killed half way through step 3 leaves its temp dir with a partial file
    torn = tmp_path / ".tmp-step_000003"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched)

    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, extra={})
    # keep=2: step 1 removed once step 3 was complete; the torn dir is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002", "step_000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_000003"


def test_checkpoint_dir_renamed_but_pointer_not_updated_still_found(tmp_path):
    model, opt, sched = make(0)
    save_checkpoint(tmp_path, step=4, model=model, optimizer=opt, scheduler=sched, extra={})
    save_checkpoint(tmp_path, step=8, model=model, optimizer=opt, scheduler=sched, extra={})
    (tmp_path / "latest").write_text("step_000004\n")  # kill fell between rename and pointer update
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000008"
    assert latest_checkpoint(tmp_path / "missing") is None


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_load_never_unpickles_objects(tmp_path):
    model, opt, sched = make(0)
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={})
    torch.save({"state": {}, "param_groups": [], "x": Evil()}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: does not load") as err:
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_bad_input_errors_name_the_fault(tmp_path):
    model, opt, sched = make(0)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={"f": object()})
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={})
    (path / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match="step_000001.*scheduler.pt"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    worker = [sys.executable, str(Path(__file__).parent / "ckpt_worker.py"), "--steps", "12", "--save-every", "4"]
    ref_log = tmp_path / "ref.jsonl"
    run_to_end(worker + ["--ckpt-dir", str(tmp_path / "ref"), "--log", str(ref_log)])

    log = tmp_path / "killed.jsonl"
    # slow steps so the kill lands while steps 5..8 run, after step 4's checkpoint is on disk
    cmd = worker + ["--ckpt-dir", str(tmp_path / "ck"), "--log", str(log), "--step-sleep", "0.15"]
    killed_at = run_killed_then_resumed(cmd, tmp_path / "ck", kill_after_step=4)
    assert killed_at in (4, 8)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    resumes = [e["step"] for e in events if e.get("event") == "resume"]
    assert resumes == [killed_at]  # the second launch resumed from the checkpoint, not from scratch

    expected = losses_by_step(ref_log)
    assert sorted(expected) == list(range(1, 13))
    assert losses_by_step(log) == expected  # exact: same floats on CPU


# ---- fall back past a checkpoint that does not load ----

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "state.json"])
def test_load_error_names_file_warns_and_falls_back(tmp_path, capsys, damage):
    model, opt, sched = make(0)
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra={"pos": 1})
    at_step1 = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, sched)
    newest = save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched,
                             extra={"pos": 2})
    if damage == "state.json":
        (newest / damage).write_text('{"step": 2, "extr')  # cut mid-write
    else:
        truncate(newest / damage)

    model2, opt2, sched2 = make(9)
    extra = load_latest_intact(tmp_path, model=model2, optimizer=opt2, scheduler=sched2)
    assert extra == {"pos": 1, "step": 1, "path": str(tmp_path / "step_000001")}
    assert f"{newest / damage}: does not load" in capsys.readouterr().err
    for k, v in model2.state_dict().items():
        assert torch.equal(v, at_step1[k]), k
    # LambdaLR 0.5**s after one scheduler step: the older checkpoint's lr, not the newer one's.
    assert sched2.get_last_lr() == [1e-2 * 0.5]


def test_no_intact_checkpoint_is_an_error_naming_each_file(tmp_path):
    model, opt, sched = make(0)
    for step in (1, 2):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, scheduler=sched, extra={})
    truncate(tmp_path / "step_000002" / "model.safetensors")
    (tmp_path / "step_000001" / "state.json").write_text('{"step": 7, "extra": {}}')  # wrong step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"step_000002/model.safetensors.*step_000001/state.json"):
        load_latest_intact(tmp_path, model=model, optimizer=opt, scheduler=sched)
    for k, v in model.state_dict().items():  # files are read before anything is restored
        assert torch.equal(v, before[k]), k
    assert load_latest_intact(tmp_path / "none", model=model, optimizer=opt, scheduler=sched) is None


def test_resume_refuses_another_runs_checkpoint_and_steps_past_max(tmp_path):
    model, opt, sched = make(0)
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.max_steps=4", "train.seed=1"])
    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched,
                    extra=run_identity(cfg))
    other_seed = load_config(None, [f"run.dir={tmp_path}", "train.max_steps=4", "train.seed=2"])
    with pytest.raises(CheckpointError, match=r"belongs to another run.*train.seed: 1 -> 2"):
        load_latest_intact(tmp_path, model=model, optimizer=opt, scheduler=sched, cfg=other_seed)
    shorter = load_config(None, [f"run.dir={tmp_path}", "train.max_steps=2", "train.seed=1"])
    with pytest.raises(CheckpointError, match=r"step 3, beyond train.max_steps=2"):
        load_latest_intact(tmp_path, model=model, optimizer=opt, scheduler=sched, cfg=shorter)
    longer = load_config(None, [f"run.dir={tmp_path}", "train.max_steps=8", "train.seed=1"])
    assert load_latest_intact(tmp_path, model=model, optimizer=opt, scheduler=sched,
                              cfg=longer)["step"] == 3


# ---- one run per run directory ----

def run_cfg(run_dir: Path, *extra: str):
    return load_config(None, [f"run.dir={run_dir}", *extra])


def test_fresh_run_refuses_a_run_dir_with_checkpoints_unless_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_cfg(run_dir), is_main=True)
    model, opt, sched = make(0)
    save_checkpoint(run_dir / "checkpoints", step=5, model=model, optimizer=opt, scheduler=sched, extra={})
    (run_dir / "metrics.jsonl").write_text('{"step": 5}\n')
    (run_dir / "best").mkdir()
    (run_dir / "test_hyps_grpo.txt").write_text("x\n")
    (run_dir / "my_notes.txt").write_text("keep me\n")  # not the project's: never removed
    with pytest.raises(CheckpointError, match=r"checkpoints of an earlier run \(up to step_000005\)"
                                              r".*--resume .*run.overwrite=true"):
        prepare_run_dir(run_cfg(run_dir), is_main=True)
    assert latest_checkpoint(run_dir / "checkpoints") is not None

    prepare_run_dir(run_cfg(run_dir, "run.overwrite=true"), is_main=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml", "my_notes.txt"]
    assert load_config(run_dir / "config.yaml").run.overwrite is True


def test_resume_needs_the_runs_config_and_the_same_settings(tmp_path):
    run_dir = tmp_path / "run"
    model, opt, sched = make(0)
    save_checkpoint(run_dir / "checkpoints", step=2, model=model, optimizer=opt, scheduler=sched, extra={})
    with pytest.raises(CheckpointError, match="no config.yaml"):
        prepare_run_dir(run_cfg(run_dir, "resume=true"), is_main=True)
    (run_dir / "config.yaml").write_text(f"run:\n  dir: {run_dir}\ntrain:\n  seed: 3\n")
    with pytest.raises(CheckpointError, match=r"config.yaml in train.seed: 3 -> 0"):
        prepare_run_dir(run_cfg(run_dir, "resume=true"), is_main=True)
    # A resumed run may run longer, and keeps its checkpoints.
    prepare_run_dir(run_cfg(run_dir, "resume=true", "train.seed=3", "train.max_steps=99"), is_main=True)
    assert load_config(run_dir / "config.yaml").train.max_steps == 99
    assert latest_checkpoint(run_dir / "checkpoints") is not None


# ---- a run directory on a cluster: one live run, requeue, leftovers ----

def test_a_live_run_holds_its_directory(tmp_path):
    # Another process holds run.dir's lock: a second run (or a resume of the live one) is refused,
    # naming the holder's pid and host.
    import socket
    import subprocess
    import sys
    import time
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from grpo_speech.checkpoint import lock_run_dir; "
        f"assert lock_run_dir(Path({str(run_dir)!r})) is None; print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"in use by a live run \(pid {holder.pid} on host "
                                                  rf"{socket.gethostname()}\)"):
            prepare_run_dir(run_cfg(run_dir), is_main=True)
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    prepare_run_dir(run_cfg(run_dir), is_main=True)  # a dead holder's lock is gone with it


def test_leftovers_of_a_killed_run_are_removed_at_start(tmp_path):
    run_dir = tmp_path / "run"
    model, opt, sched = make(0)
    save_checkpoint(run_dir / "checkpoints", step=2, model=model, optimizer=opt, scheduler=sched, extra={})
    (run_dir / "config.yaml").write_text(f"run:\n  dir: {run_dir}\n")
    leftovers = [run_dir / ".best.tmp4242", run_dir / "checkpoints" / ".tmp-step_000004",
                 run_dir / "checkpoints" / ".trash-step_000001-4242"]
    for p in leftovers:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)
    prepare_run_dir(run_cfg(run_dir, "resume=true"), is_main=True)
    assert not any(p.exists() for p in leftovers)
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_000002"


def test_a_refused_resume_leaves_the_runs_config_alone(tmp_path):
    run_dir = tmp_path / "run"
    model, opt, sched = make(0)
    save_checkpoint(run_dir / "checkpoints", step=12, model=model, optimizer=opt, scheduler=sched, extra={})
    (run_dir / "config.yaml").write_text(f"run:\n  dir: {run_dir}\ntrain:\n  max_steps: 12\n")
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"step 12, beyond train.max_steps=6"):
        prepare_run_dir(run_cfg(run_dir, "resume=true", "train.max_steps=6"), is_main=True)
    assert (run_dir / "config.yaml").read_text() == before


def test_resume_auto_resumes_a_run_with_checkpoints_and_starts_an_empty_one(tmp_path):
    from grpo_speech.checkpoint import resolve_resume
    run_dir = tmp_path / "run"
    assert resolve_resume(run_cfg(run_dir, "run.resume=auto")).resume is False
    model, opt, sched = make(0)
    save_checkpoint(run_dir / "checkpoints", step=2, model=model, optimizer=opt, scheduler=sched, extra={})
    assert resolve_resume(run_cfg(run_dir, "run.resume=auto")).resume is True
    assert resolve_resume(run_cfg(run_dir)).resume is False
