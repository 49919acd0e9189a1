"""Resumable training checkpoints, written atomically and loaded without unpickling.

A checkpoint is a directory `step_000040/` holding model.safetensors (every parameter and buffer,
trainable or frozen), optimizer.pt and scheduler.pt (plain tensor/number state, read with
`torch.load(weights_only=True)`), state.json (step + the loop's `extra`: data position etc.) and
rng_rank{r}.json (python, numpy, torch CPU/CUDA generator states of each rank). Resume = load
`latest_checkpoint(dir)` and continue; the next random numbers are the ones the run would have drawn.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


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
        state_json = json.dumps({"step": step, "world_size": _rank_world()[1], "extra": extra})
    except TypeError as e:
        raise TypeError(f"save_checkpoint: `extra` must be JSON-serialisable ({e})") from None
    ckpt_dir = Path(ckpt_dir)
    rank = _rank_world()[0]
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}step_{step:06d}"

    # Full (unsharded) state on CPU; under FSDP2 these are collectives every rank joins. FQN keys
    # make the files the same whatever the world size, so a run can resume on another GPU count.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _clean_torn(ckpt_dir)
        tmp.mkdir()
        _save_model_file(model_state, _tied_names(model), tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(state_json)
    del model_state, optim_state
    _barrier()  # tmp exists before the other ranks write their RNG files into it
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    _barrier()

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
    _barrier()
    return final


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
    """
    path = Path(path)
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    rank, world = _rank_world()
    state = json.loads((path / "state.json").read_text())

    if world == 1:
        model.load_state_dict(_load_model_file(path / "model.safetensors"), strict=True)
        if optimizer is not None:
            osd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            set_optimizer_state_dict(model, optimizer, osd)
    else:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        msd = _load_model_file(path / "model.safetensors") if rank == 0 else {}
        set_model_state_dict(model, msd, options=opts)
        del msd
        if optimizer is not None:
            osd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu") if rank == 0 else {}
            set_optimizer_state_dict(model, optimizer, osd, options=opts)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.is_file() and state.get("world_size", 1) == world:
        _set_rng_state(json.loads(rng_file.read_text()))
    elif rank == 0:
        print(f"load_checkpoint: {path} was saved with world size {state.get('world_size')}, now {world}: "
              "RNG states not restored (resumed sampling will differ from an uninterrupted run)")
    return {**state["extra"], "step": state["step"]}
