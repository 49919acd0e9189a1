"""Data parallelism with FSDP2: process group from the torchrun environment, sharding, reductions.

    python -m grpo_speech train ...                                   # one process, CPU or one GPU
    torchrun --nproc_per_node=8 -m grpo_speech train ...              # 8 GPUs, NCCL
    torchrun --nproc_per_node=2 -m grpo_speech train ...              # 2 CPU processes, gloo (tests)
Without torchrun nothing here creates a process group and every helper is a no-op. Also here:
the key of every random stream (`step_seed`), which never holds the rank, so that 1 process and
N ranks draw alike.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Gradient scaling across ranks. The loop divides every micro-batch's summed token loss by the
# GLOBAL completion-token count (all micro-batches, all ranks: the token mean of Eq. 3), so the gradient we
# want is the plain SUM of the ranks' gradients. FSDP2's reduce-scatter averages by default (divides
# by the world size), which would shrink the gradient W times. `shard_model` therefore sets every
# FSDP unit's gradient divide factor to 1 and forces sum reductions (NCCL would otherwise use its
# PreMulSum op, which gloo lacks). The loss is never multiplied by W. tests/test_distributed.py
# checks that 2 ranks with uneven token counts give the one-process gradient.


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _find(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """Shallowest submodule called `name` (Granite Speech: model.encoder, model.projector,
    model.language_model; a PEFT wrapper adds base_model.model. in front)."""
    hits = [(n.count("."), m) for n, m in model.named_modules() if n.split(".")[-1] == name]
    return min(hits, key=lambda h: h[0])[1] if hits else None


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sub-units `shard_model` wraps before the root: decoder layers, encoder, projector."""
    lm = _find(model, "language_model")
    layers = getattr(lm, "layers", None) if lm is not None else None
    if layers is None:
        raise ValueError(f"shard_model: no `language_model.layers` in {type(model).__name__}")
    return [*layers, *(p for p in (_find(model, "encoder"), _find(model, "projector")) if p is not None)]


def shard_model(model: torch.nn.Module, dist_: Dist, *, mp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Put the model on this rank's device, sharded with FSDP2 when that is needed: one unit per
    decoder layer, the speech encoder as one, the projector as one, then the root (embeddings,
    final norm, tied lm_head). Returns the model, changed in place.

    Parameters stay float32 (master weights: the optimizer updates them and keeps its state in
    float32). `mp_dtype` (e.g. torch.bfloat16) is the compute dtype: FSDP2 gathers parameters in
    it for every forward and backward and reduce-scatters gradients in float32
    (MixedPrecisionPolicy). A single process with a compute dtype runs FSDP2 on a one-rank mesh,
    so one GPU and N GPUs take the same path; a single float32 process is simply moved to its
    device (FSDP2 would only add hooks). Units may mix frozen and trainable parameters (a LoRA
    inside a frozen layer, a frozen encoder): FSDP2 reduce-scatters only the gradients that exist.
    """
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        raise ValueError("shard_model: parameters must be float32 master weights (load_model does this)")
    if dist_.world_size == 1 and mp_dtype is None:
        return model.to(dist_.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # a single process: a one-rank group for the one-rank mesh
        backend = "nccl" if dist_.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dist_.device if dist_.device.type == "cuda" else None)
    model.to(dist_.device)
    mesh = init_device_mesh(dist_.device.type, (dist_.world_size,))
    kw: dict = {"mesh": mesh}
    if mp_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    # The speech encoder computes in float32: its BatchNorm running statistics are float32 buffers
    # (FSDP2 casts parameters, not buffers) that bf16 activations cannot meet, and it runs once per
    # clip per step, so its share of the compute is small.
    encoder = _find(model, "encoder")
    for unit in fsdp_units(model):
        fully_shard(unit, **(dict(kw, mp_policy=MixedPrecisionPolicy()) if unit is encoder else kw))
    fully_shard(model, **kw)
    for m in model.modules():  # see the note on gradient scaling at the top of this file
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Sum over ranks; a float comes back as a float, a tensor as a new tensor on its device."""
    if not _initialized():
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(x.device)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def all_reduce_dict(metrics: dict[str, float]) -> dict[str, float]:
    """Sum each metric over ranks in one collective. Every rank must pass the same keys."""
    if not _initialized():
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def print0(*args, **kwargs) -> None:
    if not _initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if _initialized():
        dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process, for code that is not handed a `Dist`; (0, 1) alone."""
    if not _initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def first_error(error: str | None) -> str | None:
    """The first rank's error (None when no rank has one): a choice every rank must make alike,
    such as skipping a checkpoint that one rank could not read."""
    if not _initialized():
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` itself on one process."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, in integers (exact for any size, unlike math.ceil of a float)."""
    return -(-a // b)


def shard_indices(n: int, dist_: Dist) -> list[int]:
    """Items of rank r: r, r+W, r+2W, ... Counts may differ by one between ranks; under FSDP every
    rank must still run the same number of forward/backward passes (collectives pair up), so the
    loop sizes its micro-batch count from the largest shard."""
    return list(range(dist_.rank, n, dist_.world_size))


def all_gather_object(obj, dist_: Dist) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] on one process."""
    if not _initialized():
        return [obj]
    out = [None] * dist_.world_size
    dist.all_gather_object(out, obj)
    return out


_IN_ROOT: set[int] = set()  # ids of the models whose root forward hooks are running now


def through_root(model: torch.nn.Module, fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` inside the FSDP2 root's forward hooks (see `root_call`).

    Rollout and log-prob passes call the decoder, embeddings and lm_head directly (to reuse audio
    embeddings and never build N x V logits), not model.forward. Under FSDP2 the root unit's
    parameters (embeddings, final norm, tied lm_head) are gathered only by the root's pre-forward
    hook, and their gradients reduced by its post-backward. Calling the root with a temporary
    instance `forward` runs those hooks around `fn`. On one process, and inside another such call
    for the same model (the hooks already ran), it is a plain call.
    """
    if not is_sharded(model) or id(model) in _IN_ROOT:
        return fn(*args, **kwargs)
    # One placeholder argument: the root's pre-forward moves its inputs to the device and indexes
    # the first of them, which fails on CUDA for a call with no arguments at all.
    model.forward = lambda _placeholder: fn(*args, **kwargs)
    _IN_ROOT.add(id(model))
    try:
        return model(None)
    finally:
        _IN_ROOT.discard(id(model))
        del model.forward


def root_call(fn):
    """Decorator for functions `fn(model, ...)` that call the model's parts directly: under FSDP2
    they run inside the root's forward hooks (`through_root`), so call sites read as plain calls.
    Nested calls (sequence_logprobs encoding audio) run inside the outermost one's hooks."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        return through_root(model, fn, model, *args, **kwargs)
    return wrapper


def full_state_dict(model: torch.nn.Module, dist_: Dist) -> dict | None:
    """The unsharded state dict on CPU (a collective under FSDP2); None for a model that is not
    sharded, which is already whole."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def progress(steps, dist_: Dist, desc: str = ""):
    """A progress bar with ETA on rank 0; the plain iterable elsewhere (with a no-op postfix)."""
    if dist_.is_main:
        from tqdm import tqdm
        return tqdm(steps, desc=desc, dynamic_ncols=True)
    return _Quiet(steps)


class _Quiet(list):
    def set_postfix_str(self, *_args, **_kwargs) -> None:
        pass


def is_distributed() -> bool:
    """True under torchrun with more than one rank."""
    return _initialized()


def all_reduce_max(n: int) -> int:
    """The largest `n` over ranks (`n` itself on one process): how many micro-batches every rank
    runs when local batches differ in size, since every FSDP forward and backward is a collective."""
    if not _initialized():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank: an all-reduce MAX of one number (the flag
    itself on one process). Loops whose length depends on local data, such as decoding until EOS,
    agree on their length with it, since every FSDP forward is a collective."""
    if not _initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# Every seeded stream of the trainer, the evaluation and the pretraining recipe, by purpose: the
# key is a function of the run's seed and of where the stream is used (the step, the epoch, a
# batch's place in its split), never of the rank, so 1 process and N ranks draw the same numbers.
# Integer keys seed torch generators (a CPU generator keeps the low 32 bits of its seed) or
# random.Random; text keys seed random.Random. Each formula is the one its stream has always
# had: a seed gives the tokens, losses and scores it always gave. tests/test_seeds.py checks that
# each purpose's keys differ over seeds and steps. Torch keys of different purposes can coincide:
# step k's sampling noise is the evaluation batch's at row 97k (step 0 and every evaluation's first
# batch), and at seed 0 on a CPU epoch 0's order is step 0's noise. Separating them changes every
# seeded result.
SEED_KEYS = {
    # train.py
    "data-order": lambda seed, epoch: seed * 7919 + epoch,  # torch: the permutation of an epoch
    "prompt-wording": lambda seed, step: seed * 1_000_003 + step,  # random: the step's instructions
    "rollout": lambda seed, step: seed * 1_000_003 + step * 97,  # torch: the step's sampling noise
    "off-policy": lambda seed, step: f"off-policy-{seed}-{step}-0",  # random: MP-GRPO's extra answers
    # evaluate.py and data/loader.py
    "evaluation": lambda seed, position: seed * 1_000_003 + position,  # torch: a generation batch's noise
    "evaluation-wording": lambda seed, example_id: f"prompt-{seed}-{example_id}",  # random: one example's
    "loader": lambda seed: seed,  # torch: the loader's worker base seeds (no item draws from them)
    # recipes/pretrain.py
    "pretrain-init": lambda seed: seed,  # torch (global): the model's initial weights
    "pretrain-epoch": lambda seed, epoch, words_only: f"pretrain-{seed}-{epoch}-{words_only}",
    "pretrain-instruct": lambda seed: f"instruct-{seed}",  # the last phase's task draws
    "pretrain-instruct-epoch": lambda seed, task, epoch: f"instruct-{seed}-{task}-{epoch}",
    "pretrain-wording": lambda seed, step: f"{seed}-{step}",  # a step's instructions
    "pretrain-text": lambda seed, step: f"text-{seed}-{step}",  # a step's text-only pairs
    "pretrain-generate": lambda seed, start: seed * 1_000_003 + start,  # torch and random: a generation batch
    "pretrain-text-pairs": lambda seed: seed + 2,  # synthetic data: the text-only translation pool
    "pretrain-corpus": lambda seed: seed + 7,  # synthetic data: the tokenizer's training text
}


def step_seed(seed: int, purpose: str, *parts) -> int | str:
    """The key of one random stream: `purpose` names its row of SEED_KEYS, `parts` are where it
    is used (the step, the epoch, a batch's place in its split, ...), in that row's order."""
    return SEED_KEYS[purpose](seed, *parts)
