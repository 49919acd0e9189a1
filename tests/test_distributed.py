"""FSDP2 on 2 CPU processes (gloo) gives the one-process result, the loss variants' step gradients
included; helpers are no-ops alone.

    .venv/bin/python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from grpo_speech.checkpoint import load_checkpoint
from grpo_speech.distributed import (
    Dist, all_reduce_dict, all_reduce_sum, barrier, fsdp_units, init_distributed, print0, shard_indices, shard_model,
)

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import ToySpeechLM  # noqa: E402

WORKER = str(Path(__file__).parent / "dist_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One reference process and one 2-rank torchrun of the same three steps (~20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    _run([sys.executable, WORKER, "--out", str(root / "one")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          WORKER, "--out", str(root / "two")], env)
    return root / "one", root / "two"


def _run(cmd: list[str], env: dict, timeout: float = 180.0) -> None:
    # own session: a hung run is killed with its worker processes, not just the launcher
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        assert proc.wait(timeout=timeout) == 0, f"{cmd} failed with rc {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_ranks_match_one_process(runs):
    one, two = runs
    r1 = json.loads((one / "result.json").read_text())
    r2 = json.loads((two / "result.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    # Gradients of step 1 (before clipping): same sums in another order, fp32. Measured max
    # difference 2.4e-7 at a largest entry of 1.4; averaging instead of summing over ranks would be
    # off by a factor 2 (about 0.7 on that entry), so atol 1e-6 separates the two by 5 orders.
    g1 = safetensors.torch.load_file(str(one / "grads1.safetensors"))
    g2 = safetensors.torch.load_file(str(two / "grads1.safetensors"))
    assert g1.keys() == g2.keys()
    assert not any("encoder" in k or "qkv" in k for k in g1)  # frozen parts get no gradient
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=1e-6, msg=k)
    # pre-clip norms 6.93 and 6.41 > max_norm 0.5: clipping was active and saw the global norm
    for a, b in zip(r2["grad_norms"], r1["grad_norms"]):
        assert abs(a - b) <= 1e-6 * b
    for a, b in zip(r2["losses"], r1["losses"]):
        assert abs(a - b) <= 1e-6 * b
    # parameters after 3 AdamW steps, frozen ones included (measured max difference 1.2e-7)
    p1 = safetensors.torch.load_file(str(one / "params3.safetensors"))
    p2 = safetensors.torch.load_file(str(two / "params3.safetensors"))
    assert p1.keys() == p2.keys()
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-6, msg=k)
    # 0 + 1 over ranks, and 1 + 1
    assert r2["reduced"] == {"rank": 1.0, "one": 2.0}


def test_granite_speech_two_ranks_match_one_process(runs):
    # tiny Granite Speech sharded per decoder layer + encoder + projector + root, 9 vs 3 tokens per
    # rank; measured max difference 6e-8 at a largest gradient of 0.64 (fp32 summation order)
    one, two = runs
    g1 = safetensors.torch.load_file(str(one / "granite_grads.safetensors"))
    g2 = safetensors.torch.load_file(str(two / "granite_grads.safetensors"))
    assert g1.keys() == g2.keys() and len(g1) > 20
    assert not any(k.startswith("model.encoder.") for k in g1)  # frozen
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=1e-6, msg=k)


def test_shared_prefix_pass_on_two_ranks(runs):
    # FSDP2 units per decoder layer: the shared pass's gradients equal the per-row pass's on 2
    # ranks, and those of 1 process (relative to each parameter's largest entry, with a floor of
    # 1e-5 x the largest entry of all for gradients that are 0 in exact arithmetic: key biases).
    one, two = runs
    g1 = safetensors.torch.load_file(str(one / "shared_prefix_grads.safetensors"))
    g2 = safetensors.torch.load_file(str(two / "shared_prefix_grads.safetensors"))
    shared = [k for k in g2 if k.startswith("shared.")]
    assert len(shared) > 20 and any("projector" in k for k in shared)
    floor = 1e-5 * max(float(g.abs().max()) for g in g2.values())
    for k in shared:
        want = g2["row." + k[len("shared."):]]
        scale = max(float(want.abs().max()), floor)
        assert float((g2[k] - want).abs().max()) <= 1e-4 * scale, k
        assert float((g2[k] - g1[k]).abs().max()) <= 1e-4 * scale, k


def test_loss_variants_two_ranks_match_one_process(runs):
    # Each variant whose normaliser is global (tokens, rows, rows x max_new_tokens) and the batch
    # std of scale_rewards=batch, counted over both ranks: the step gradient of 2 ranks x 3 prompts
    # is the one of 6 prompts in one process, to float64 rounding (a rank-local count would
    # roughly double it).
    one, two = runs
    g1 = safetensors.torch.load_file(str(one / "loss_variant_grads.safetensors"))
    g2 = safetensors.torch.load_file(str(two / "loss_variant_grads.safetensors"))
    assert set(g1) == set(g2) == {"dapo", "grpo", "dr_grpo", "cispo", "gspo", "delta_batch_std"}
    for k in g1:
        assert g1[k].abs().sum() > 0
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=1e-14, msg=k)
    assert all(not torch.equal(g1["dapo"], g1[k]) for k in g1 if k != "dapo")  # each variant acts


def test_sharded_checkpoint_resumes_exactly(runs):
    for out in runs:  # a fresh sharded model + optimizer loaded from step 2 repeats step 3 bit for bit
        r = json.loads((out / "result.json").read_text())
        assert r["resumed_params_equal"]
        assert r["loss3_resumed"] == r["losses"][2]


def test_two_rank_checkpoint_loads_in_one_process(runs):
    one, two = runs
    loaded = []
    for out in (one, two):
        model = ToySpeechLM()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        extra = load_checkpoint(out / "ckpt" / "step_000002", model=model, optimizer=opt, scheduler=None)
        assert extra == {"step": 2}
        loaded.append((model, opt))
        with safetensors.safe_open(str(out / "ckpt" / "step_000002" / "model.safetensors"), framework="pt") as f:
            # the tie is stored once even when gathered from FSDP2 shards as two equal copies
            assert "lm_head.weight" not in f.keys()
            assert json.loads(f.metadata()["aliases"]) == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    (m1, o1), (m2, o2) = loaded
    assert m2.lm_head.weight is m2.model.language_model.embed_tokens.weight
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
    for p1, p2 in zip(o1.param_groups[0]["params"], o2.param_groups[0]["params"]):
        assert int(o1.state[p1]["step"]) == int(o2.state[p2]["step"]) == 2
        torch.testing.assert_close(o2.state[p2]["exp_avg"], o1.state[p1]["exp_avg"], rtol=0, atol=1e-6)


def test_single_process_helpers_are_no_ops(monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = init_distributed()
    assert (d.rank, d.world_size, d.local_rank, d.is_main) == (0, 1, 0, True)
    assert not torch.distributed.is_initialized()
    x = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_sum(x), x)
    assert all_reduce_sum(3.0) == 3.0
    assert all_reduce_dict({"a": 1.0}) == {"a": 1.0}
    barrier()
    print0("hello")
    assert capsys.readouterr().out == "hello\n"
    model = ToySpeechLM()
    assert shard_model(model, d) is model


def test_shard_indices_strided():
    # 7 items over 3 ranks: rank r takes r, r+3, r+6 while < 7
    assert [shard_indices(7, Dist(r, 3, r, torch.device("cpu"))) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard_indices(3, Dist(0, 1, 0, torch.device("cpu"))) == [0, 1, 2]


def test_fsdp_units_of_granite_speech():
    from transformers import GraniteSpeechForConditionalGeneration

    from grpo_speech.model import tiny_config

    model = GraniteSpeechForConditionalGeneration(tiny_config(50, 49))
    inner = model.model
    expected = [*inner.language_model.layers, inner.encoder, inner.projector]
    assert [id(u) for u in fsdp_units(model)] == [id(u) for u in expected]
    assert len(inner.language_model.layers) >= 1
