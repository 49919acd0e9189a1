"""Resumable training checkpoints, written atomically and loaded without unpickling.

A checkpoint is a directory `step_000040/` holding model.safetensors (every parameter and buffer,
trainable or frozen), optimizer.pt and scheduler.pt (plain tensor/number state, read with
`torch.load(weights_only=True)`), state.json (step + the loop's `extra`: data position etc.) and
rng_rank{r}.json (python, numpy, torch CPU/CUDA generator states of each rank). Resume = load
the newest intact checkpoint and continue; the next random numbers are the ones the run would have
drawn. A checkpoint that does not load (a kill or a full disk mid-write) is named and skipped for
the one before it; a run directory never mixes two runs (`prepare_run_dir`), and a checkpoint
carries its run's config, so a resume cannot continue another run's weights.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from grpo_speech.config import UserError, flat_dict, load_config, replace, save_config
from grpo_speech.distributed import barrier, broadcast_object, first_error, print0, rank_world
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_RE = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"  # a directory being written (or torn by a kill): never read, removed on sight
_TRASH_PREFIX = ".trash-"  # a checkpoint being deleted: renamed first so no reader sees it half gone
_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
# What a run writes into run.dir (train.py, evaluate.py): all that run.overwrite=true removes.
RUN_OUTPUTS = ("checkpoints", "best", "rollouts", "config.yaml", "metrics.jsonl", "metrics.tmp",
               "results.json", "results.md", "prompt.json", "test_references.jsonl", "stopped.json",
               "reward.png", "validation.png", "eval.json", "tensorboard", "wandb",
               "test_hyps_*.txt", ".best.old*", ".best.tmp*")
# Keys a resumed run may change: where things are, how often it reports, and how long it runs.
# Every other key defines the run (seed, data, model, method, optimiser) and must match.
RESUME_MAY_CHANGE = ("resume", "run.resume", "run.dir", "run.overwrite", "data.dir", "data.audio_root",
                     "run.tensorboard", "run.wandb", "train.max_steps", "train.eval_every", "train.save_every",
                     "train.log_every",
                     "train.rollouts_every", "model.logprob_chunk_size",
                     "model.gradient_checkpointing", "eval.batch_size", "eval.max_test_examples",
                     "eval.bertscore_model", "data.num_workers", "data.prefetch")


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be used; the message names the file."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only fd is enough for fsync on Linux, dirs included
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _clean_torn(ckpt_dir: Path) -> None:
    """Remove temp/trash directories a killed writer left behind (called by the writer only)."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def _complete_steps(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


# ---- tensors: dedupe shared storage (tied embeddings) for safetensors, record the aliases ----

def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """alias -> first name, for parameters/buffers registered under several names (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _dedupe(state: dict[str, torch.Tensor], tied: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory, and Granite ties lm_head.weight to
    embed_tokens.weight: keep one copy and record `alias -> kept name`. Unsharded, a tie is one
    storage; gathered from FSDP2 shards it arrives as two equal copies, found through `tied`."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        if tied.get(name) in kept and torch.equal(kept[tied[name]], t):
            aliases[name] = tied[name]
            continue
        seen[key] = name
        # another view into a storage already kept (not the same tensor) is written as a copy
        kept[name] = t.clone() if ptr in storages and t.numel() > 0 else t.contiguous()
        storages.add(ptr)
    return kept, aliases


def _save_model_file(state: dict[str, torch.Tensor], tied: dict[str, str], path: Path) -> None:
    tensors, aliases = _dedupe(state, tied)
    safetensors.torch.save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _load_model_file(path: Path) -> dict[str, torch.Tensor]:
    state = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


# ---- RNG states as JSON (no pickles) ----

def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        saved = [torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


# ---- public API ----

def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict,
    keep: int = 2,
) -> Path:
    """Write `ckpt_dir/step_{step:06d}/` atomically and point `ckpt_dir/latest` at it.

    Every rank must call it (FSDP2 state is gathered with collectives); rank 0 writes the model,
    optimizer and scheduler, each rank its own RNG state. The directory is written under a temp
    name, fsynced and renamed, so a kill at any moment leaves either the old or the new checkpoint.
    Only then are checkpoints beyond the newest `keep` removed. Returns the checkpoint path.
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    if "step" in extra and extra["step"] != step:
        raise ValueError(f"save_checkpoint: extra['step']={extra['step']} differs from step={step}")
    try:
        state_json = json.dumps({"step": step, "world_size": rank_world()[1], "extra": extra})
    except TypeError as e:
        raise TypeError(f"save_checkpoint: `extra` must be JSON-serialisable ({e})") from None
    ckpt_dir = Path(ckpt_dir)
    rank = rank_world()[0]
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}step_{step:06d}"

    # Full (unsharded) state on CPU; under FSDP2 these are collectives every rank joins. FQN keys
    # make the files the same whatever the world size, so a run can resume on another GPU count.
    # When only a LoRA (and maybe the projector) trains, the model file holds those parameters
    # alone: the rest is the base model, identified in `extra["base"]` (adapter-sized checkpoints).
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = trainable_names(model) if adapter_sized(model) else None
    model_state = _trainable_state(model) if trainable else get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    if trainable:
        state_json = json.dumps({**json.loads(state_json), "trainable": trainable})

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _clean_torn(ckpt_dir)
        tmp.mkdir()
        _save_model_file(model_state, _tied_names(model), tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(state_json)
    del model_state, optim_state
    barrier()  # tmp exists before the other ranks write their RNG files into it
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    barrier()

    if rank == 0:
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if final.exists():  # re-saving a step (resumed from an older checkpoint)
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_path(ckpt_dir)
        pointer = ckpt_dir / "latest.tmp"
        pointer.write_text(final.name + "\n")
        _fsync_path(pointer)
        os.replace(pointer, ckpt_dir / "latest")
        _fsync_path(ckpt_dir)
        # prune only older checkpoints, and only now that the new one is complete
        older = [p for s, p in _complete_steps(ckpt_dir) if s < step]
        for p in older[: max(len(older) - (keep - 1), 0)]:
            _remove_dir(p)
    barrier()
    return final


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_sized(model: torch.nn.Module) -> bool:
    """True when only a LoRA and/or the projector train: checkpoints then hold the trainable
    parameters alone (about 17 M of the 2B's 3 B at r=64), and the base model is loaded from its
    path and checked by identity on resume. Full-model training writes every parameter."""
    names = trainable_names(model)
    return bool(names) and len(names) < len(list(model.parameters())) and all(
        "lora_" in n or n.startswith("model.projector.") for n in names)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole CPU tensors (under FSDP2 each is gathered: a collective
    every rank joins in the same order)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Copy an adapter-sized checkpoint's parameters into the model; under FSDP2 rank 0 holds
    them and each is scattered into the shards (distribute_tensor broadcasts from rank 0)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):
            full = state[name] if state is not None else torch.empty(p.shape, dtype=p.dtype)
            shard = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(state[name])


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint in `ckpt_dir`, or None.

    Only fully written checkpoints carry a `step_N` name (they are renamed into place), so the
    highest one is the latest even if a kill fell between the rename and the `latest` pointer
    update; the pointer file is for people and scripts. Temp dirs of a killed writer are ignored
    here (another process may be writing one right now) and removed by the next `save_checkpoint`.
    """
    ckpt_dir = Path(ckpt_dir)
    steps = _complete_steps(ckpt_dir)
    return steps[-1][1] if steps else None


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG states from `path`.

    Returns the saved `extra` with `step` added. Every rank must call it; under FSDP2 rank 0
    reads the tensors and broadcasts them into the shards (one full copy in host memory, not N).
    Every file is read before anything is restored, so a file that does not load (CheckpointError
    naming it) leaves the model and optimizer as they were.
    """
    loaded = _read_checkpoint(Path(path), optimizer is not None, scheduler is not None, trainable_names(model))
    return _restore(loaded, model=model, optimizer=optimizer, scheduler=scheduler)


def _names(names: list[str]) -> str:
    return f"{len(names)} tensors ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"


def _read_checkpoint(path: Path, want_optimizer: bool, want_scheduler: bool,
                     model_names: list[str] | None = None) -> dict:
    """Every file of this rank's share of checkpoint `path`, read and checked; CheckpointError
    names the first file that does not load (truncated, not JSON, or a pickle of objects)."""
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    rank, _ = rank_world()

    def read(name: str, fn):
        try:
            return fn(path / name)
        except Exception as e:  # safetensors, torch.load, json: each has its own error types
            raise CheckpointError(f"{path / name}: does not load ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]})") from e

    state = read("state.json", lambda f: json.loads(f.read_text()))
    m = _STEP_RE.match(path.name)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)
            and isinstance(state.get("extra"), dict)) or (m and int(m.group(1)) != state["step"]):
        raise CheckpointError(f"{path / 'state.json'}: does not load (expected "
                              f"{{'step': {int(m.group(1)) if m else 'N'}, 'extra': {{...}}}})")
    if state.get("trainable") is not None and model_names is not None and state["trainable"] != model_names:
        raise CheckpointError(f"{path}: holds the trainable parameters {_names(state['trainable'])}, but "
                              f"this run trains {_names(model_names)} (another model.train or LoRA)")
    loaded = {"path": path, "state": state, "model": None, "optimizer": None, "scheduler": None,
              "rng": None}
    if rank == 0:
        loaded["model"] = read("model.safetensors", _load_model_file)
        if want_optimizer:
            loaded["optimizer"] = read("optimizer.pt", lambda f: torch.load(
                f, weights_only=True, map_location="cpu"))
    if want_scheduler:
        loaded["scheduler"] = read("scheduler.pt", lambda f: torch.load(f, weights_only=True))
    if (path / f"rng_rank{rank}.json").is_file():
        loaded["rng"] = read(f"rng_rank{rank}.json", lambda f: json.loads(f.read_text()))
    return loaded


def _restore(loaded: dict, *, model, optimizer, scheduler) -> dict:
    path, state = loaded["path"], loaded["state"]
    rank, world = rank_world()
    if state.get("trainable") is not None:
        _load_trainable(model, loaded["model"])
        if optimizer is not None and world == 1:
            set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
    elif world == 1:
        model.load_state_dict(loaded["model"], strict=True)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
    else:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, loaded["model"] if rank == 0 else {}, options=opts)
    if world > 1:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, loaded["optimizer"] if rank == 0 else {},
                                     options=opts)
    loaded["model"] = loaded["optimizer"] = None  # free the host copy
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])

    if loaded["rng"] is not None and state.get("world_size", 1) == world:
        _set_rng_state(loaded["rng"])
    elif rank == 0:
        print(f"load_checkpoint: {path} was saved with world size {state.get('world_size')}, now {world}: "
              "RNG states not restored (resumed sampling will differ from an uninterrupted run)")
    return {**state["extra"], "step": state["step"]}


def load_latest_intact(
    ckpt_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    cfg=None,
    prompts=None,
    base: dict | None = None,
) -> dict | None:
    """Restore the newest checkpoint in `ckpt_dir` that loads (None when there is none).

    A checkpoint that does not load (a truncated file, a bad state.json) is named in a warning
    and the next older one is tried; when none loads, CheckpointError lists them all. With `cfg`,
    the checkpoint must belong to this run (the config it was saved with, `run_identity`) and lie
    within train.max_steps, and with `prompts` render its prompts as they were (the chat template
    and system turn unchanged), and an adapter-sized one must apply to `base` (model.base_identity).
    Returns the saved `extra` with `step` and `path` added.
    """
    candidates = [p for _, p in reversed(_complete_steps(Path(ckpt_dir)))]
    failures = []
    for path in candidates:
        try:
            loaded = _read_checkpoint(path, optimizer is not None, scheduler is not None, trainable_names(model))
            error = None
        except CheckpointError as e:
            loaded, error = None, str(e)
        error = first_error(error)
        if error is not None:
            failures.append(error)
            print0(f"warning: {error}; trying an older checkpoint", file=sys.stderr)
            continue
        if cfg is not None:
            _check_belongs(path, loaded["state"], cfg, prompts, base)
        extra = _restore(loaded, model=model, optimizer=optimizer, scheduler=scheduler)
        return {**extra, "path": str(path)}
    if failures:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} loads: " + "; ".join(failures))
    return None


# ---- run directories: one run per run.dir, so two runs never interleave their checkpoints ----

def run_identity(cfg, prompts=None) -> dict:
    """What a checkpoint records of its run (for `extra`): the resolved config, seed included, and
    the rendered prompt of its first example (data.prompts.Prompts.rendered)."""
    return {"config": flat_dict(cfg), **({"prompt": prompts.rendered} if prompts is not None else {})}


def config_diff(saved: dict, cfg) -> list[str]:
    """'key: saved -> now' for each run-defining key that differs (RESUME_MAY_CHANGE aside)."""
    def plain(v):  # a list setting comes back from JSON as a list, from the config as a tuple
        return list(v) if isinstance(v, tuple) else v

    now = flat_dict(cfg)
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now
            if k in saved and k not in RESUME_MAY_CHANGE and plain(saved[k]) != plain(now[k])]


def _check_belongs(path: Path, state: dict, cfg, prompts=None, base: dict | None = None) -> None:
    saved_base = state["extra"].get("base")
    if state.get("trainable") is not None and base is not None and saved_base is not None and saved_base != base:
        raise CheckpointError(
            f"{path} holds adapter weights for the base {saved_base.get('path')!r} (config "
            f"{saved_base.get('config_sha256', '')[:12]}, weights {saved_base.get('weights_sha256', '')[:12]}), "
            f"not for the base loaded now, {base.get('path')!r} (config {base.get('config_sha256', '')[:12]}, "
            f"weights {base.get('weights_sha256', '')[:12]}): resume with the run's own base model")
    saved_prompt = state["extra"].get("prompt")
    if prompts is not None and saved_prompt is not None and saved_prompt != prompts.rendered:
        raise CheckpointError(
            f"{path} was trained on prompts rendered as {saved_prompt!r}, now {prompts.rendered!r} "
            "(the model's chat template or data.system_prompt changed): resume with the run's model")
    saved = state["extra"].get("config")
    diff = config_diff(saved, cfg) if isinstance(saved, dict) else []
    if diff:
        raise CheckpointError(
            f"{path} belongs to another run (its config differs: {', '.join(diff)}): resume with "
            "the run's own settings, or start a fresh run in another run.dir")
    if state["step"] > cfg.train.max_steps:
        raise CheckpointError(
            f"{path} is at step {state['step']}, beyond train.max_steps={cfg.train.max_steps}: "
            f"set train.max_steps >= {state['step']} to resume it")


_RUN_LOCKS: dict[str, int] = {}  # run.dir -> the descriptor whose flock this process holds


def resolve_resume(cfg):
    """run.resume=auto: resume when run.dir holds checkpoints (the config check that follows
    refuses another run's), start fresh when it holds none. Otherwise cfg as it is."""
    if cfg.resume or cfg.run.resume != "auto":
        return cfg
    has_steps = bool(_complete_steps(Path(cfg.run.dir) / "checkpoints"))
    return replace(cfg, resume=True) if has_steps else cfg


def lock_run_dir(run_dir: Path) -> str | None:
    """Take run.dir's exclusive lock (flock on run.dir/.lock, held until the process ends or
    `unlock_run_dir`); None, or a one-line error naming the holder's pid and host."""
    key = str(run_dir.resolve())
    if key in _RUN_LOCKS:
        return None
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        os.close(fd)
        return (f"run.dir {str(run_dir)!r} is in use by a live run ({holder}): one run per "
                "directory; wait for it, stop it, or choose another run.dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    _RUN_LOCKS[key] = fd
    return None


def forget_run_locks() -> None:
    """In a forked child (a data worker): close this copy of every run.dir lock descriptor. A flock
    belongs to every copy of its descriptor; the parent's copy keeps the lock, and a child that
    outlives a killed parent no longer holds the directory."""
    for fd in _RUN_LOCKS.values():
        os.close(fd)
    _RUN_LOCKS.clear()


def unlock_run_dir(run_dir: Path) -> None:
    fd = _RUN_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary and trash directories a killed run of this directory left behind (a half-written
    best/, a checkpoint being written or pruned): removed under the run's lock, so nothing writes
    them now. With a real model each is gigabytes."""
    (run_dir / "stopped.json").unlink(missing_ok=True)  # the stop a requeued run resumes from
    patterns = [".best.tmp*", ".best.old*", "metrics.tmp", f"checkpoints/{_TMP_PREFIX}*",
                f"checkpoints/{_TRASH_PREFIX}*", "checkpoints/latest.tmp"]
    for pattern in patterns:
        for name in glob.glob(glob.escape(str(run_dir)) + "/" + pattern):
            p = Path(name)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            print(f"removed {p}, left by a killed run", flush=True)


def _same_directory_everywhere(run_dir: Path, is_main: bool) -> str | None:
    """Every rank must see rank 0's run.dir (a shared file system across nodes): rank 0 writes a
    fresh token there and every rank reads it back."""
    token = run_dir / ".run-token"
    if is_main:
        token.write_text(f"{os.getpid()}-{time.time_ns()}\n")
    value = broadcast_object(token.read_text() if is_main else "")
    if not token.is_file() or token.read_text() != value:
        return (f"run.dir {str(run_dir)!r} is not the same directory on every rank (rank "
                f"{rank_world()[0]} on {socket.gethostname()} does not see rank 0's files): put "
                "it on a file system every node shares")
    return None


def prepare_run_dir(cfg, *, is_main: bool) -> None:
    """Make run.dir ready for `train` and write the resolved config there. Every rank calls it
    (the checks only read; rank 0 writes).

    - One run per directory: rank 0 holds run.dir/.lock for the life of the run; a second run, or
      a resume of a live one, is refused naming the holder. Every rank must see the directory.
    - A fresh run refuses a run.dir holding checkpoints: resuming would then load another run's
      steps. With run.overwrite=true it first removes what a run writes (RUN_OUTPUTS), nothing else.
    - A resumed run needs the run's config.yaml beside its checkpoints, its run-defining keys
      must match the saved ones (RESUME_MAY_CHANGE lists the others), and its newest checkpoint
      must lie within train.max_steps; config.yaml is rewritten only once the resume is accepted.
    - Leftovers of a killed run (temporary and trash directories) are removed.
    """
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run.dir {str(run_dir)!r} is a file, not a directory")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    error = lock_run_dir(run_dir) if is_main else None
    error = first_error(error)
    if error:
        raise CheckpointError(error)
    barrier()
    error = first_error(_same_directory_everywhere(run_dir, is_main))
    barrier()
    if is_main:
        (run_dir / ".run-token").unlink(missing_ok=True)
    if error:
        raise CheckpointError(error)
    steps = _complete_steps(run_dir / "checkpoints")
    saved = run_dir / "config.yaml"
    if cfg.resume:
        if steps and not saved.is_file():
            raise CheckpointError(f"{run_dir} holds checkpoints but no config.yaml: cannot tell "
                                  "whether they belong to this run; resume refused")
        if saved.is_file():
            diff = config_diff(flat_dict(load_config(saved)), cfg)
            if diff:
                raise CheckpointError(
                    f"the config differs from the run's {saved} in {', '.join(diff)}: a resumed "
                    "run keeps its settings (start a fresh run in another run.dir to change them)")
        if steps and steps[-1][0] > cfg.train.max_steps:
            raise CheckpointError(
                f"{steps[-1][1]} is at step {steps[-1][0]}, beyond train.max_steps={cfg.train.max_steps}: "
                f"set train.max_steps >= {steps[-1][0]} to resume it")
        if is_main:
            print(f"resuming {run_dir}", flush=True)
    elif steps:
        if not cfg.run.overwrite:
            raise CheckpointError(
                f"run.dir {str(run_dir)!r} holds the checkpoints of an earlier run (up to "
                f"{steps[-1][1].name}): continue it with `train --resume {run_dir}` (or "
                "run.resume=auto), choose another run.dir, or set run.overwrite=true to replace it")
        if is_main:
            clear_run_dir(run_dir)
    barrier()  # every rank has checked before rank 0 rewrites the directory
    if is_main:
        _remove_leftovers(run_dir)
        save_config(cfg, saved)
    barrier()


def clear_run_dir(run_dir: str | Path) -> list[str]:
    """Remove the outputs a run writes (RUN_OUTPUTS) from run_dir; files of anyone else stay.
    Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for pattern in RUN_OUTPUTS:
        for name in sorted(glob.glob(glob.escape(str(run_dir)) + "/" + pattern)):
            p = Path(name)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    if removed:
        print(f"run.overwrite=true: removed {', '.join(removed)} from {run_dir}", flush=True)
    return removed
