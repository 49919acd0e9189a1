"""Tests of the GRPO math in grpo_speech/loss.py; expected values are derived by hand below.

Run: .venv/bin/python -m pytest -q tests/test_loss.py
"""
import math

import pytest
import torch

from grpo_speech.loss import policy_loss, group_advantages, kl_k3, sft_loss

LN2 = math.log(2.0)


def test_group_advantages_2x3():
    rewards_PG = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.2, 0.8]], dtype=torch.float64)
    # Row 0: mean 0.5, deviations (-0.5, 0, 0.5), unbiased var (0.25 + 0 + 0.25) / 2 = 0.25,
    #   std 0.5 -> A = (-1, 0, 1) with eps = 0.
    # Row 1: mean 0.4, deviations (-0.2, -0.2, 0.4), var (0.04 + 0.04 + 0.16) / 2 = 0.12,
    #   std sqrt(0.12) = 0.2 * sqrt(3) -> A = (-1/sqrt(3), -1/sqrt(3), 2/sqrt(3)).
    s3 = math.sqrt(3.0)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1 / s3, -1 / s3, 2 / s3]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards_PG, eps=0.0), expected, rtol=0, atol=1e-12)
    # Default eps = 1e-4 on row 0: +-0.5 / (0.5 + 1e-4) = +-0.5 / 0.5001.
    a = group_advantages(rewards_PG)
    torch.testing.assert_close(a[0], torch.tensor([-0.5 / 0.5001, 0.0, 0.5 / 0.5001], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_group_advantages_constant_group_and_group_of_one_are_exactly_zero():
    # 0.1 is not exact in binary, so the float mean of three 0.1s may differ from 0.1 by an ulp:
    # the result must still be exactly 0, not (ulp / eps).
    rewards_PG = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0.7, 0.7, 0.7]])
    assert torch.equal(group_advantages(rewards_PG), torch.zeros(3, 3))
    assert torch.equal(group_advantages(torch.tensor([[0.4], [0.9]])), torch.zeros(2, 1))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        group_advantages(torch.tensor([[0.1, 0.2], [float("nan"), 0.3]]))
    with pytest.raises(ValueError, match="\\(P, G\\)"):
        group_advantages(torch.tensor([0.1, 0.2]))


def test_kl_k3_values():
    logp = torch.zeros(4, dtype=torch.float64)
    ref = torch.tensor([0.0, LN2, -LN2, 1.0], dtype=torch.float64)
    # d = ref - logp: exp(d) - d - 1 ->
    #   d = 0: 1 - 0 - 1 = 0;  d = ln2: 2 - 0.693147 - 1 = 0.306853;
    #   d = -ln2: 0.5 + 0.693147 - 1 = 0.193147;  d = 1: e - 2 = 0.718282.
    expected = torch.tensor([0.0, 1.0 - LN2, LN2 - 0.5, math.e - 2.0], dtype=torch.float64)
    torch.testing.assert_close(kl_k3(logp, ref), expected, rtol=0, atol=1e-12)


def test_clipping_on_both_sides_with_positive_and_negative_advantages():
    # old = -1 everywhere; logp = log(s) - 1 gives ratios s.
    ratios_BT = torch.tensor([[1.5, 0.5], [0.5, 1.5]], dtype=torch.float64)
    old_BT = torch.full((2, 2), -1.0, dtype=torch.float64)
    logp_BT = (ratios_BT.log() - 1.0).requires_grad_()
    adv_B = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask_BT = torch.ones(2, 2)
    loss, m = policy_loss(logp_BT, old_BT, None, adv_B, mask_BT, beta=0.0)
    # Row 0, A = +1: s = 1.5 -> min(1.5, 1.2) = 1.2 (upper clip, gradient 0);
    #                s = 0.5 -> min(0.5, 0.8) = 0.5 (unclipped, dl/dlogp = s*A = 0.5).
    # Row 1, A = -1: s = 0.5 -> min(-0.5, -0.8) = -0.8 (lower clip, gradient 0);
    #                s = 1.5 -> min(-1.5, -1.2) = -1.5 (unclipped, dl/dlogp = -1.5).
    # loss = -(1.2 + 0.5 - 0.8 - 1.5) / 4 = 0.15; dloss/dlogp = -[[0, 0.5], [0, -1.5]] / 4.
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.0, -0.125], [0.0, 0.375]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert m["clip_low_count"].item() == 1 and m["clip_high_count"].item() == 1
    # The loss returns raw sums and counts; the fractions and means are their ratios.
    on = m["on_policy_tokens"].item()
    assert m["clip_low_count"].item() / on == 0.25 and m["clip_high_count"].item() / on == 0.25
    assert m["tokens"].item() == 4 and m["on_policy_tokens"].item() == 4
    # (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.0; (1 - 1) / 2 rows = 0.
    assert m["ratio_sum"].item() / on == pytest.approx(1.0, abs=1e-6)
    assert m["advantage_sum"].item() / m["rows"].item() == 0.0
    # pg_sum = 1.2 + 0.5 - 0.8 - 1.5 = -0.6
    assert m["pg_sum"].item() == pytest.approx(-0.6, abs=1e-6)


def test_off_policy_row_is_not_clipped():
    # Row 0 is the MP-GRPO reference (pi_phi = 1), A = 2, probs (0.25, 0.5); its old log-probs
    # (log 0.01) would give ratios 25 and 50, far past the clip, if it were treated as on-policy.
    # Row 1 is on-policy with s = 1 and A = -1.
    logp_BT = torch.tensor([[math.log(0.25), math.log(0.5)], [-2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    old_BT = torch.tensor([[math.log(0.01)] * 2, [-2.0, -3.0]], dtype=torch.float64)
    adv_B = torch.tensor([2.0, -1.0], dtype=torch.float64)
    off_B = torch.tensor([True, False])
    loss, m = policy_loss(logp_BT, old_BT, None, adv_B, torch.ones(2, 2), off_policy_B=off_B, beta=0.0)
    # Row 0: l = exp(logp) * A = (0.5, 1.0), dl/dlogp = exp(logp) * A = (0.5, 1.0).
    # Row 1: l = min(1 * -1, clip(1) * -1) = -1, dl/dlogp = s * A = -1.
    # loss = -(0.5 + 1.0 - 1 - 1) / 4 = 0.125; grad = -[[0.5, 1.0], [-1, -1]] / 4.
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-0.125, -0.25], [0.25, 0.25]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert m["clip_low_count"].item() == 0 and m["clip_high_count"].item() == 0
    assert m["off_policy_tokens"].item() == 2 and m["on_policy_tokens"].item() == 2
    assert m["off_policy_prob_sum"].item() == pytest.approx(0.75, abs=1e-6)
    assert m["ratio_sum"].item() / m["on_policy_tokens"].item() == pytest.approx(1.0, abs=1e-6)


def test_kl_term_value_and_gradient():
    # A = 0 and s = 1, so l = 0 and only the KL term acts. d = ref - logp = ln2, beta = 0.5:
    # loss = -(0 - 0.5 * (1 - ln2)) = 0.5 * 0.306853 = 0.153426;
    # dkl/dlogp = 1 - exp(d) = -1, so dloss/dlogp = beta * (-1) = -0.5.
    logp_BT = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref_BT = torch.tensor([[-1.0 + LN2]], dtype=torch.float64)
    loss, m = policy_loss(logp_BT, logp_BT.detach(), ref_BT, torch.zeros(1, dtype=torch.float64),
                        torch.ones(1, 1), beta=0.5)
    assert loss.item() == pytest.approx(0.5 * (1.0 - LN2), abs=1e-12)
    loss.backward()
    assert logp_BT.grad.item() == pytest.approx(-0.5, abs=1e-12)
    assert m["kl_sum"].item() / m["tokens"].item() == pytest.approx(1.0 - LN2, abs=1e-6)


def test_no_gradient_into_advantages_old_or_reference():
    g = torch.Generator().manual_seed(0)
    logp_BT = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    old_BT = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    ref_BT = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    adv_B = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    loss, m = policy_loss(logp_BT, old_BT, ref_BT, adv_B, torch.ones(3, 4), off_policy_B=torch.tensor([0, 0, 1]))
    loss.backward()
    assert logp_BT.grad is not None
    assert old_BT.grad is None and ref_BT.grad is None and adv_B.grad is None
    assert all(not v.requires_grad for v in m.values())


def test_all_zero_mask_gives_zero_not_nan():
    # Masked positions hold -inf (pad tokens); they must not leak NaN into loss or gradient.
    logp_BT = torch.full((2, 3), float("-inf"), requires_grad=True)
    mask_BT = torch.zeros(2, 3)
    loss, m = policy_loss(logp_BT, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask_BT)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp_BT.grad, torch.zeros(2, 3))
    # Raw sums of an empty batch are 0; log.step_record turns 0 / 0 into 0 (tests/test_log.py).
    assert m["tokens"].item() == 0 and m["clip_low_count"].item() == 0 and m["kl_sum"].item() == 0
    sloss, _ = sft_loss(logp_BT, mask_BT)
    assert sloss.item() == 0.0


def test_masked_positions_do_not_count():
    # Same tokens as the off-policy test's row 1 (s = 1, A = -1, l = -1 per token) plus a masked
    # position with a garbage log-prob: loss = -(-1 - 1) / 2 = 1.
    logp_BT = torch.tensor([[-2.0, -3.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    old_BT = torch.tensor([[-2.0, -3.0, 5.0]], dtype=torch.float64)
    loss, _ = policy_loss(logp_BT, old_BT, None, torch.tensor([-1.0], dtype=torch.float64),
                        torch.tensor([[1, 1, 0]]), beta=0.0)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_one_vs_four_micro_batches_same_gradient():
    g = torch.Generator().manual_seed(1)
    B, T = 8, 6
    base_BT = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    old_BT = base_BT + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios far enough to clip
    ref_BT = base_BT + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv_B = torch.randn(B, generator=g, dtype=torch.float64)
    mask_BT = torch.rand(B, T, generator=g) < 0.7
    mask_BT[5] = False  # a row with no tokens
    off_B = torch.zeros(B, dtype=torch.bool)
    off_B[[3, 7]] = True
    num_tokens = int(mask_BT.sum())  # counted once for the whole optimiser step

    full_BT = base_BT.clone().requires_grad_()
    loss, _ = policy_loss(full_BT, old_BT, ref_BT, adv_B, mask_BT, off_policy_B=off_B, denominator=num_tokens)
    loss.backward()

    micro_BT = base_BT.clone().requires_grad_()
    total = 0.0
    for rows in torch.arange(B).chunk(4):
        part, _ = policy_loss(micro_BT[rows], old_BT[rows], ref_BT[rows], adv_B[rows], mask_BT[rows],
                            off_policy_B=off_B[rows], denominator=num_tokens)
        part.backward()
        total += part.item()
    assert total == pytest.approx(loss.item(), abs=1e-14)
    torch.testing.assert_close(micro_BT.grad, full_BT.grad, rtol=0, atol=1e-15)
    assert full_BT.grad.abs().sum() > 0


def test_sft_loss_token_mean():
    # Row 0: -log 0.5 - log 0.25 = ln2 + 2 ln2 = 3 ln2 over 2 tokens -> 1.5 ln2; row 1 masked.
    logp_BT = torch.tensor([[math.log(0.5), math.log(0.25)], [-7.0, -9.0]], dtype=torch.float64, requires_grad=True)
    mask_BT = torch.tensor([[1, 1], [0, 0]])
    loss, m = sft_loss(logp_BT, mask_BT)
    assert loss.item() == pytest.approx(1.5 * LN2, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-0.5, -0.5], [0.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert m["tokens"].item() == 2 and m["nll_sum"].item() == pytest.approx(3 * LN2, abs=1e-6)
    # An explicit global count of 6 tokens: 3 ln2 / 6 = 0.5 ln2.
    loss6, _ = sft_loss(logp_BT, mask_BT, num_tokens=6)
    assert loss6.item() == pytest.approx(0.5 * LN2, abs=1e-12)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(3), torch.ones(2, 3), beta=0.0)
    with pytest.raises(ValueError, match="old_logprobs_BT"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, torch.zeros(2), torch.ones(2, 3), beta=0.0)
    with pytest.raises(ValueError, match="ref_logprobs_BT is None"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3), beta=0.02)
