"""Batches built by DataLoader workers: the same batches, in the same order, as in the training
process; the global RNG untouched; a run with workers gives the numbers of a run without.

    .venv/bin/python -m pytest -q tests/test_data_loader.py
"""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grpo_speech.config import load_config
from grpo_speech.data import load_split
from grpo_speech.data.loader import GenerationBatches, loader
from grpo_speech.data.prompts import run_prompts
from grpo_speech.train import StepBatches, collate_step, step_indices, train
from tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model (own BPE tokenizer) and a 12/2/2-clip synthetic ast dataset."""
    root = tmp_path_factory.mktemp("loader")
    return root, make_tiny_run(root, 12)


def overrides(root, run, **extra):
    base = {"task": "ast", "model.path": str(root / "base"), "data.dir": str(root / "data"),
            "data.n_train": 12, "data.n_val": 2, "data.n_test": 2, "run.dir": str(root / run),
            "run.evaluate": "false", "train.max_steps": 3, "train.prompts_per_step": 4,
            "train.micro_batch_size": 4, "train.save_every": 100, "grpo.group_size": 2,
            "grpo.max_new_tokens": 5, "train.lr": 1e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return np.array_equal(x, y)
        if isinstance(x, list):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def test_workers_build_the_batches_the_training_process_would(setup):
    root, processor = setup
    cfg = load_config(None, overrides(root, "unused"))
    examples = load_split(cfg, "train").examples
    prompts = run_prompts(cfg, processor.tokenizer)
    one_rank = SimpleNamespace(rank=0, world_size=1)
    dataset = StepBatches(examples, processor, one_rank, prompts, cfg)
    # Steps 2-5 (a resumed run's first steps, across the epoch boundary at step 3 of 12 rows),
    # built here one by one as the loop did before there was a loader.
    direct = [collate_step([examples[i] for i in step_indices(s, 12, 4, 0)], processor, one_rank,
                           prompts, rng=random.Random(s), skip_bad=False) for s in range(2, 6)]
    rng_before = torch.get_rng_state()
    for workers in (0, 2):
        built = list(loader(dataset, range(2, 6), workers=workers, prefetch=2, seed=0))
        assert len(built) == 4 and all(same(a, b) for a, b in zip(built, direct)), workers
    # The loader drew nothing from the global RNG (its own generator seeds its workers).
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Generation batches: the same with and without workers too.
    gen = GenerationBatches(examples, processor, prompts, batch_size=5, seed=0)
    plain = list(loader(gen, range(0, 12, 5), workers=0, prefetch=1, seed=0))
    forked = list(loader(gen, range(0, 12, 5), workers=2, prefetch=1, seed=0))
    assert [len(b["ids"]) for b in plain] == [5, 5, 2]
    assert all(same(a, b) for a, b in zip(plain, forked))


def test_a_run_with_workers_gives_the_numbers_of_a_run_without(setup):
    root, _ = setup
    runs = {}
    for workers in (0, 2):
        train(load_config(None, overrides(root, f"run_w{workers}", **{"data.num_workers": workers})))
        lines = (root / f"run_w{workers}" / "metrics.jsonl").read_text().splitlines()
        runs[workers] = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
                         for line in lines]
    assert len(runs[0]) == 3 and runs[0] == runs[2]


def test_a_process_with_live_workers_still_exits(tmp_path):
    # Workers ignore SIGTERM (a scheduler's stop signal), which is how multiprocessing ends
    # daemonic children at exit; a loader still referenced at exit (a run stopped by an
    # exception keeps its frames alive) used to leave the process joining its worker forever.
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "live_worker.py"
    script.write_text(
        "import torch\n"
        "from grpo_speech.data.loader import loader\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 10\n"
        "    def __getitem__(self, i): return i\n"
        "it = iter(loader(Items(), range(10), workers=1, prefetch=2, seed=0))\n"
        "assert next(it) == 0\n"
        "KEEP = [it]\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, start_new_session=True)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            import os
            import signal
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
