"""Batches built off the training thread: a torch DataLoader whose workers read and decode audio,
resample it and compute the processor's features for the next items while the model works.

Every item is a pure function of its index (the step, or the generation batch) and fixed seeds, so
the batches and their order are the same with 0 or N workers, and a resumed run gets the batches
it would have had.
"""
from __future__ import annotations

import atexit
import os
import random
import signal
import threading
import time

import torch

from grpo_speech.data.collate import collate
from grpo_speech.distributed import step_seed


def _as_is(batch):
    return batch


def _worker_init(worker_id: int) -> None:
    """A worker is a forked copy of the training process that must not act as one.
    - It ignores the stop signals. A scheduler signals every process of the job (and Ctrl-C the
      whole process group): the training process finishes its step, checkpoints and exits
      (train.StopRequests), and its workers end with it; a worker that died of the signal would
      abort that step instead, and one that kept the inherited handler would announce a stop.
    - It lets go of run.dir's lock (checkpoint.lock_run_dir). A flock belongs to every copy of its
      descriptor, so a worker that outlived a killed trainer (until it notices, a few seconds)
      would refuse the resumed run its run.dir."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    from grpo_speech import checkpoint
    checkpoint.forget_run_locks()  # this copy only: the trainer's descriptor keeps the lock
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose trainer was killed (SIGKILL, the OOM killer) ends within a second. torch's
    own check ends the worker's loop, but its exit then joins the thread that feeds the result
    pipe, which blocks for good on a full pipe nobody reads: an orphan holding its memory."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing ends its daemonic children with SIGTERM, then joins
    them. A worker ignores SIGTERM (_worker_init), so one whose loader is still referenced (a run
    that stopped with an exception keeps its frames, and so its batch iterator, alive) would be
    joined forever: the process would never exit. Registered after multiprocessing's own exit
    handler, this runs first and kills them."""
    import multiprocessing
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(timeout=5)


def loader(dataset: torch.utils.data.Dataset, items, *, workers: int, prefetch: int,
           seed: int) -> torch.utils.data.DataLoader:
    """Items of `dataset` in the order of `items`, built by `workers` processes `prefetch` items
    ahead each (0 workers: in this process, when asked for). The loader has its own generator: one
    without draws its workers' base seed from the global torch RNG, which would shift every later
    sample and break bitwise resume. The items use no worker RNG."""
    if workers:
        import multiprocessing.util  # noqa: F401 - its exit handler must be registered before ours
        atexit.unregister(_kill_workers_at_exit)
        atexit.register(_kill_workers_at_exit)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=list(items), num_workers=workers, collate_fn=_as_is,
        prefetch_factor=prefetch if workers else None, worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(step_seed(seed, "loader")))


class GenerationBatches(torch.utils.data.Dataset):
    """Item `start`: examples[start:start + batch_size] collated for generation, each example's
    prompt wording drawn from (seed, its id) alone (evaluate.generate_texts)."""

    def __init__(self, examples: list[dict], processor, prompts, batch_size: int, seed: int):
        self.examples, self.processor, self.prompts = examples, processor, prompts
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, start: int) -> dict:
        batch_examples = self.examples[start:start + self.batch_size]
        rngs = [random.Random(step_seed(self.seed, "evaluation-wording", ex["id"])) for ex in batch_examples]
        return collate(batch_examples, self.processor, rng=rngs, templates=list(self.prompts.templates),
                       system=self.prompts.system)
