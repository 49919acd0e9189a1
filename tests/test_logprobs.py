"""Chunked log-probs (grpo_speech/logprobs.py) against full logits computed naively in float64.

Run: .venv/bin/python -m pytest -q tests/test_logprobs.py
"""
import pytest
import torch

import grpo_speech.logprobs
from grpo_speech.logprobs import chunk_shape, token_logprobs


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # Let chunk_size alone set the chunk, so that these small shapes are cut into many chunks.
    monkeypatch.setattr(grpo_speech.logprobs, "MIN_CHUNK_ELEMENTS", 1)


def _reference(hidden, weight, targets, scale, upstream):
    """Full N x V logits in float64: log-probs and, through autograd, their input gradients."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = (h @ w.t()) / scale
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(0, w.shape[0] - 1)[..., None])[..., 0]
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad


def _inputs(B, T, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scale like a real head: logits of order +-10 before the logit scale.
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)  # arbitrary dL/dlogp
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("max_rows", [2048, 4])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 21, 1000])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_matches_full_logits_fp32(chunk_size, weight_grad, max_rows, monkeypatch):
    # N = 3 * 7 = 21 rows, V = 37. Chunks are min(21, max_rows) rows by ceil(chunk_size * 37 / rows)
    # columns: with 21 rows, chunk 1 gives blocks of 2 columns (the last of 1), chunk 5 of 9
    # (last 1), chunk 21 and 1000 the whole vocabulary; with 4 rows, row chunks 4,4,4,4,4,1 too.
    monkeypatch.setattr(grpo_speech.logprobs, "MAX_CHUNK_ROWS", max_rows)
    hidden, weight, targets, upstream = _inputs(3, 7, 16, 37, torch.float32)
    logit_scale, temperature = 8.0, 0.7
    ref_logp, ref_gh, ref_gw = _reference(hidden, weight, targets, logit_scale * temperature, upstream)

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(weight_grad)
    logp = token_logprobs(h, w, targets, logit_scale=logit_scale, temperature=temperature, chunk_size=chunk_size)
    assert logp.dtype == torch.float32 and logp.shape == (3, 7)
    (logp * upstream.float()).sum().backward()

    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=0, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(w.grad.double(), ref_gw, rtol=0, atol=1e-5)
    else:
        assert w.grad is None


def test_odd_sizes_and_weight_only_gradient():
    # N = 1 * 13 rows, H = 9, V = 101 (prime), chunks of 4: hidden frozen, weight trained.
    hidden, weight, targets, upstream = _inputs(1, 13, 9, 101, torch.float32, seed=3)
    ref_logp, _, ref_gw = _reference(hidden, weight, targets, 2.5, upstream)
    w = weight.clone().requires_grad_()
    logp = token_logprobs(hidden, w, targets, logit_scale=2.5, chunk_size=4)
    (logp * upstream.float()).sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=0, atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32():
    # The float64 reference sees the same bf16 values, exactly upcast. Log-probs are computed in
    # fp32 from them, so they keep fp32 accuracy (1e-5). Gradients come back in bf16: rounding to
    # 8 significant bits gives a relative error up to 2^-9, so rtol = 2^-8 (atol 1e-5 for ~0 entries).
    hidden, weight, targets, upstream = _inputs(2, 9, 24, 53, torch.bfloat16, seed=5)
    ref_logp, ref_gh, ref_gw = _reference(hidden, weight, targets, 8.0, upstream)
    for weight_grad in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        logp = token_logprobs(h, w, targets, logit_scale=8.0, chunk_size=4)
        assert logp.dtype == torch.float32
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
        (logp * upstream.float()).sum().backward()
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.double(), ref_gh, rtol=2 ** -8, atol=1e-5)
        if weight_grad:
            assert w.grad.dtype == torch.bfloat16
            torch.testing.assert_close(w.grad.double(), ref_gw, rtol=2 ** -8, atol=1e-5)


def test_ignore_targets_are_clamped_and_logprobs_sum_to_one():
    hidden, weight, _, _ = _inputs(1, 4, 8, 11, torch.float32, seed=7)
    targets = torch.tensor([[3, -100, 11, 250]])  # -100 and ids >= V stand for masked positions
    logp = token_logprobs(hidden, weight, targets, chunk_size=3)
    ref_logp, _, _ = _reference(hidden, weight, torch.tensor([[3, 0, 10, 10]]), 1.0, torch.zeros(1, 4))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-6)
    # Over every target id, the probabilities of one row sum to 1.
    every = torch.arange(11)[None, :]
    probs = token_logprobs(hidden[:, :1].expand(1, 11, 8), weight, every, chunk_size=4).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_no_grad_pass_and_tied_weight_accumulates():
    hidden, weight, targets, upstream = _inputs(2, 3, 8, 19, torch.float32, seed=9)
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        assert token_logprobs(hidden, w, targets).grad_fn is None
    # Tied embeddings: the same weight is used as embedding and as head; gradients add up.
    emb = w[targets]  # (B, T, H), gradient into rows of w
    logp = token_logprobs(hidden + emb, w, targets, logit_scale=3.0, chunk_size=2)
    (logp * upstream.float()).sum().backward()
    h = (hidden.double() + weight.double()[targets]).detach()
    ref_logp, ref_gh, ref_gw = _reference(h, weight, targets, 3.0, upstream)
    expected_gw = ref_gw.index_add(0, targets.reshape(-1), ref_gh.reshape(-1, 8))
    torch.testing.assert_close(w.grad.double(), expected_gw, rtol=0, atol=1e-5)


def test_chunk_shape():
    # Eager chunks: min(N, max_rows) rows by ceil(elements / rows) columns, at most V, the last
    # chunk of a row holding the rest. 21 rows and 5 x 37 = 185 logits: ceil(185 / 21) = 9 columns.
    assert chunk_shape(21, 37, 185, 2048) == (21, 9)
    assert chunk_shape(21, 37, 185, 4) == (4, 37)  # ceil(185 / 4) = 47 columns, capped at V
    # Kernel chunks: at most elements / rows columns, evened out into whole tiles. A 50 MiB bf16
    # buffer (26,214,400 logits) over 3200 rows fits 8192 columns, and 49160 = 6 x 8192 + 8 would
    # end in an 8-column launch; instead 7 chunks of ceil(49160 / 7) = 7023 columns, rounded up to
    # 28 tiles of 256 = 7168: 6 x 7168 + 6152.
    assert chunk_shape(3200, 49160, 26_214_400, 26_214_400 // 256, col_tile=256) == (3200, 7168)
    assert chunk_shape(3200, 300, 26_214_400, 26_214_400 // 256, col_tile=256) == (3200, 300)


def test_no_rows():
    # An empty batch gives empty log-probs and gradients (no chunk of zero rows to divide by).
    h = torch.zeros(0, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    logp = token_logprobs(h, w, torch.zeros(0, 5, dtype=torch.long))
    assert logp.shape == (0, 5)
    logp.sum().backward()
    assert h.grad.shape == (0, 5, 8) and torch.all(w.grad == 0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="weight_VH"):
        token_logprobs(torch.zeros(2, 3, 8), torch.zeros(10, 7), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets_BT"):
        token_logprobs(torch.zeros(2, 3, 8), torch.zeros(10, 8), torch.zeros(2, 4, dtype=torch.long))
