"""Shared-prefix log-prob passes: each prompt once per group gives the per-row numbers.

The per-row pass (`sequence_logprobs(..., shared_prefix=False)`: one [prompt ; completion]
sequence per row) is the reference. In fp32 the shared pass must give the same log-probs to 1e-5
and every trainable parameter the same gradient to 1e-4 relative, with rows that end at different
lengths, prompts of different lengths padded in one micro-batch, whichever part trains.

Run: .venv/bin/python -m pytest -q tests/test_prefix.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rollout import random_speech_model  # noqa: E402

from grpo_speech.model import recompute_layers, set_trainable  # noqa: E402
from grpo_speech.prefix import packed_layout, prompts_of_groups  # noqa: E402
from grpo_speech.rollout import add_reference_samples, sample_groups, sequence_logprobs  # noqa: E402

G = 4


def _model(parts: str, lora: bool = False):
    model, proc, tok = random_speech_model()
    if lora:
        from peft import LoraConfig
        model.config.has_lora_adapter = True
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    set_trainable(model, parts)
    model.eval()
    g = torch.Generator().manual_seed(0)
    audio = [torch.randn(16000, generator=g) * 0.1, torch.randn(24000, generator=g) * 0.1,
             torch.randn(12000, generator=g) * 0.1]
    # Three prompts of different text and clip lengths: two are left padded.
    batch = proc(["<|audio|> hi", "say <|audio|> something long the cat", "<|audio|> the mat"], audio,
                 return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(dim=1).sum() == 2
    return model, tok, batch


def _rollout(model, tok, batch, *, eos=None):
    """G samples per prompt whose rows end at different lengths: an id that greedy decoding
    emits mid-row serves as EOS."""
    if eos is None:
        greedy = sample_groups(model, batch, group_size=1, max_new_tokens=12, temperature=0, tokenizer=tok)
        eos = greedy.completion_ids_BT[1, 3].item()
    r = sample_groups(model, batch, group_size=G, max_new_tokens=12, temperature=1.0, tokenizer=tok,
                      eos_token_id=eos, generator=torch.Generator().manual_seed(1))
    lengths = r.mask_BT.sum(dim=1)
    assert len(set(lengths.tolist())) >= 3, lengths  # rows end at different steps
    return r


def _pass(model, batch, r, shared, rows=None, audio=True):
    """(log-probs, {name: grad}) of a weighted sum of the log-probs of `rows`."""
    model.zero_grad(set_to_none=True)
    ids, mask = r.completion_ids_BT, r.mask_BT
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    lp = sequence_logprobs(model, batch, r.audio_embeds if audio else None, ids, mask, group_size=G,
                           rows_B=rows, temperature=0.8, shared_prefix=shared)
    weights = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


def _assert_same(model, batch, r, **kw):
    lp_row, g_row = _pass(model, batch, r, False, **kw)
    lp_shared, g_shared = _pass(model, batch, r, True, **kw)
    assert (r.mask_BT.sum(dim=1) > 0).all()
    torch.testing.assert_close(lp_shared, lp_row, atol=1e-5, rtol=0)
    assert g_row.keys() == g_shared.keys() and g_row, "no trainable parameter got a gradient"
    # Relative to each parameter's largest gradient entry; a gradient that is 0 in exact
    # arithmetic (a key bias: softmax ignores a shift shared by all keys) is rounding noise, so
    # the scale has a floor of 1e-5 x the largest entry of any parameter.
    floor = 1e-5 * max(g.abs().max() for g in g_row.values())
    for name, g in g_row.items():
        scale = torch.maximum(g.abs().max(), floor)
        assert (g_shared[name] - g).abs().max() / scale < 1e-4, name
    return lp_row, g_row


def test_the_packed_layout_by_hand():
    # One prompt of 3 slots (the first is padding), G = 2 completions of T = 2 (the second has one
    # token): L = 3 + 2*2 = 7 positions [pad p0 p1 | a0 a1 | b0 pad].
    attn_PT = torch.tensor([[0, 1, 1]])
    mask_BT = torch.tensor([[1, 1], [1, 0]])
    position_PL, allowed, read_BT = packed_layout(attn_PT, mask_BT, 2)
    assert position_PL.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    want = [  # key:  pad p0 p1 a0 a1 b0 bpad
        [1, 0, 0, 0, 0, 0, 0],   # pad attends itself only
        [0, 1, 0, 0, 0, 0, 0],   # p0
        [0, 1, 1, 0, 0, 0, 0],   # p1
        [0, 1, 1, 1, 0, 0, 0],   # a0: the prompt and itself
        [0, 1, 1, 1, 1, 0, 0],   # a1
        [0, 1, 1, 0, 0, 1, 0],   # b0: the prompt, not completion a
        [0, 1, 1, 0, 0, 1, 1],   # b's padding: itself (finite, never read)
    ]
    assert allowed[0, 0].int().tolist() == want
    # a0 and b0 are predicted by p1 (position 2), a1 by a0 (3), b's second slot by b0 (5).
    assert read_BT.tolist() == [[2, 3], [2, 5]]


def test_rows_must_be_whole_groups():
    assert prompts_of_groups(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]), 3, 4).tolist() == [1, 0]
    with pytest.raises(ValueError, match="whole groups"):
        prompts_of_groups(torch.tensor([0, 1, 2, 4]), 2, 4)
    with pytest.raises(ValueError, match="whole number"):
        prompts_of_groups(torch.tensor([0, 1]), 2, 4)


@pytest.mark.parametrize("parts,lora", [("llm", False), ("lora", True), ("projector", False),
                                         ("encoder", False)])
def test_shared_pass_equals_per_row(parts, lora):
    model, tok, batch = _model(parts, lora)
    r = _rollout(model, tok, batch)
    _, grads = _assert_same(model, batch, r)
    if lora:
        assert all("lora" in n for n in grads)
    if parts in ("projector", "encoder"):  # the audio is re-encoded for its gradient
        assert all(n.startswith(f"model.{parts}.") for n in grads)


def test_micro_batches_of_whole_groups_and_reference_rows():
    model, tok, batch = _model("llm")
    r = _rollout(model, tok, batch)
    # MP-GRPO: the last row of each group is the reference answer (off-policy; same prompt).
    r = add_reference_samples(r, ["the cat sits on the mat", "hello", "ein Mann liest ein Buch"], tok,
                              group_size=G, max_new_tokens=12)
    full, _ = _assert_same(model, batch, r)
    # A micro-batch of prompts 2 and 0, in that order: the same numbers as in the whole batch.
    rows = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])
    sub, _ = _assert_same(model, batch, r, rows=rows)
    torch.testing.assert_close(sub, full[rows], atol=1e-5, rtol=0)


def test_gradient_checkpointing_and_no_audio_reuse():
    model, tok, batch = _model("llm")
    r = _rollout(model, tok, batch)
    lp_plain, _ = _pass(model, batch, r, True)
    lm = model.model.language_model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    hook = lm.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with recompute_layers(model):
            lp_ckpt, _ = _assert_same(model, batch, r, audio=False)
    finally:
        hook.remove()
        lm.activation_checkpointing_disable()
    assert len(calls) == 4  # per-row and shared: each a forward, then recomputed in backward
    torch.testing.assert_close(lp_ckpt, lp_plain, atol=1e-5, rtol=0)


def _train(tmp_path, name, shared: bool, extra=()):
    from grpo_speech.config import load_config
    from grpo_speech.train import train

    from tiny_run import make_tiny_run

    root = tmp_path / "world"
    if not (root / "base").exists():
        make_tiny_run(root, 8)
    # The embedded base (trained: its rows end at different lengths) on a few synthetic clips.
    cfg = load_config("experiments/tiny/ast_grpo.yaml", [
        f"data.dir={root / 'data'}", f"run.dir={tmp_path / name}", "run.evaluate=false",
        "data.n_train=8", "data.n_val=2", "data.n_test=2", "train.max_steps=3", "train.prompts_per_step=4",
        "grpo.group_size=4", "train.micro_batch_size=8", "grpo.max_new_tokens=24", "data.num_workers=0",
        "train.save_every=100", f"model.shared_prefix={str(shared).lower()}", *extra])
    train(cfg)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [["grpo.num_iterations=2"], ["method=mpgrpo"]], ids=["two-passes", "mpgrpo"])
def test_training_steps_match_the_per_row_passes(tmp_path, extra):
    # Two micro-batches of two whole groups each; with two passes the old-policy log-probs come
    # from the shared pass too, and the second pass's ratios move away from 1.
    row = _train(tmp_path, "per_row", False, extra)
    shared = _train(tmp_path, "shared", True, extra)
    assert len(row) == len(shared) == 3
    assert any(r["loss/total"] != 0 for r in row) and row[0]["optim/grad_norm"] > 0
    assert all(r["rollout/truncated_frac"] < 1 for r in row)  # rows ended by EOS
    for a, b in zip(row, shared):
        assert a["rollout/len_mean"] == b["rollout/len_mean"]  # the same samples
        for key in ("loss/total", "optim/grad_norm", "loss/kl", "reward/mean", "ratio/mean", "clip/frac"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_eager_attention_takes_the_additive_mask_and_other_kernels_are_refused():
    model, tok, batch = _model("llm")
    r = _rollout(model, tok, batch)
    lm = model.model.language_model
    lm.config._attn_implementation = "eager"  # the LM's layers read it at each call
    try:
        _assert_same(model, batch, r)
        lm.config._attn_implementation = "flash_attention_2"  # takes no 4-D mask
        with pytest.raises(ValueError, match="model.shared_prefix=false"):
            _pass(model, batch, r, True)
    finally:
        lm.config._attn_implementation = "sdpa"
