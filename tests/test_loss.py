"""Tests of the GRPO math in grpo_speech/loss.py; expected values are derived by hand below, and
each loss variant is also checked against a second implementation written in this file from the
papers' formulas (loops over rows and tokens, nothing shared with loss.py).

Run: .venv/bin/python -m pytest -q tests/test_loss.py
"""
import math

import pytest
import torch

from grpo_speech.loss import group_advantages, kl_k3, policy_loss, sft_loss

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
    # (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.0.
    assert m["ratio_sum"].item() / on == pytest.approx(1.0, abs=1e-6)
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


# ---- Variants: scale_rewards, loss_type, importance_sampling, delta, per-token advantages ----

def test_scale_rewards_batch_and_none_by_hand():
    rewards_PG = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.2, 0.8], [0.3, 0.3, 0.3]], dtype=torch.float64)
    # none (Dr. GRPO): r - mean(group). Means 0.5, 0.4, 0.3.
    none = group_advantages(rewards_PG, scale="none")
    torch.testing.assert_close(none, torch.tensor([[-0.5, 0.0, 0.5], [-0.2, -0.2, 0.4], [0.0, 0.0, 0.0]],
                                                  dtype=torch.float64), rtol=0, atol=1e-15)
    # batch: the std of all 9 rewards. Sum 0+0.5+1+0.2+0.2+0.8+0.9 = 3.6, mean 0.4; squared
    # deviations 0.16+0.01+0.36+0.04+0.04+0.16+3*0.01 = 0.80, unbiased var 0.80/8 = 0.1, std
    # sqrt(0.1) = 0.316228. With eps = 0: A = (r - mean(group)) / sqrt(0.1).
    batch = group_advantages(rewards_PG, eps=0.0, scale="batch")
    s = math.sqrt(0.1)
    want = torch.tensor([[-0.5 / s, 0.0, 0.5 / s], [-0.2 / s, -0.2 / s, 0.4 / s], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(batch, want, rtol=0, atol=1e-12)
    # A std given by the loop (the whole step over all ranks) is used as given: 0.5 + eps 1e-4.
    given = group_advantages(rewards_PG, scale="batch", batch_std=0.5)
    assert given[0, 2].item() == pytest.approx(0.5 / 0.5001, abs=1e-12)
    # The constant group (row 2) is exactly 0 under each, as under group scaling.
    assert torch.equal(batch[2], torch.zeros(3, dtype=torch.float64)) and torch.equal(given[2], batch[2])
    with pytest.raises(ValueError, match="group, batch or none"):
        group_advantages(rewards_PG, scale="std")


def test_normalisers_grpo_dr_grpo_bnpo_by_hand():
    # s = 1 (old = logp), beta = 0, so l = A on every token. Row 0: 3 tokens, A = +1; row 1: 1
    # token, A = -1. Token sum 3 - 1 = 2.
    logp_BT = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -9.0, -9.0]], dtype=torch.float64)
    mask_BT = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv_B = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def run(**kw):
        x = logp_BT.clone().requires_grad_()
        loss, _ = policy_loss(x, logp_BT, None, adv_B, mask_BT, beta=0.0, **kw)
        loss.backward()
        return loss.item(), x.grad

    # dapo / bnpo (token mean): -2 / 4 = -0.5; dloss/dlogp = -A / 4.
    loss, grad = run()
    assert loss == pytest.approx(-0.5, abs=1e-15)
    torch.testing.assert_close(grad, torch.tensor([[-0.25] * 3, [0.25, 0, 0]], dtype=torch.float64), rtol=0, atol=1e-15)
    # grpo (row means, then the mean over 2 rows): row means +1 and -1 -> loss -(1 - 1) / 2 = 0;
    # dloss/dlogp = -A / (|o_i| * 2): row 0 -1/6 per token, row 1 +1/2.
    loss, grad = run(row_mean=True)
    assert loss == 0.0
    torch.testing.assert_close(grad, torch.tensor([[-1 / 6] * 3, [0.5, 0, 0]], dtype=torch.float64), rtol=0, atol=1e-15)
    # grpo with the step's 4 rows counted by the loop (2 more rows in other micro-batches): -0 / 4.
    assert run(row_mean=True, denominator=4)[1][1, 0].item() == pytest.approx(0.25, abs=1e-15)
    # dr_grpo: 2 rows x max_new_tokens 5 = 10 -> loss -2 / 10 = -0.2, dloss/dlogp = -A / 10.
    loss, grad = run(denominator=2 * 5)
    assert loss == pytest.approx(-0.2, abs=1e-15)
    torch.testing.assert_close(grad, torch.tensor([[-0.1] * 3, [0.1, 0, 0]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_cispo_truncates_the_weight_and_keeps_every_gradient():
    # The clipping test's tensors: old = -1, ratios s = [[1.5, 0.5], [0.5, 1.5]], A = (+1, -2),
    # eps_high = 0.2. Weights sg(min(s, 1.2)) = [[1.2, 0.5], [0.5, 1.2]]; logp = ln(s) - 1.
    # l = w * A * logp: row 0: 1.2 (ln1.5 - 1) + 0.5 (-ln2 - 1); row 1: -2 (0.5 (-ln2 - 1) + 1.2 (ln1.5 - 1)).
    # Sum = -(1.2 (ln1.5 - 1) + 0.5 (-ln2 - 1)) = 1.560015; loss = -sum / 4 = -0.390004.
    # dloss/dlogp = -w * A / 4 = [[-0.3, -0.125], [0.25, 0.6]]: the token at s = 1.5 with A > 0
    # still moves (the surrogate gives it 0), with its weight held at 1.2.
    ratios_BT = torch.tensor([[1.5, 0.5], [0.5, 1.5]], dtype=torch.float64)
    logp_BT = (ratios_BT.log() - 1.0).requires_grad_()
    adv_B = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, m = policy_loss(logp_BT, torch.full((2, 2), -1.0, dtype=torch.float64), None, adv_B, torch.ones(2, 2),
                          beta=0.0, truncated_is=True)
    a, b = math.log(1.5) - 1.0, -LN2 - 1.0
    assert loss.item() == pytest.approx((1.2 * a + 0.5 * b) / 4, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-0.3, -0.125], [0.25, 0.6]], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # Truncated weights: the two tokens at s = 1.5; no lower bound.
    assert m["clip_high_count"].item() == 2 and m["clip_low_count"].item() == 0


def test_sequence_ratio_is_one_per_row_and_clipped_per_row():
    # old = 0, so log ratio = logp. A = (+1, -1, -1), eps 0.2, 6 tokens.
    # Row 0: log ratios (ln2, 0), mean ln2/2, s = sqrt(2) = 1.414 > 1.2 with A > 0: l = 1.2 on
    #   both tokens, gradient 0 (token ratios 2 and 1 would leave the second token unclipped).
    # Row 1: (0.1, -0.1), mean 0, s = 1: l = -1 on both, gradient s * A = -1 per token.
    # Row 2: (-0.3, -0.5), mean -0.4, s = e^-0.4 = 0.670 < 0.8 with A < 0: l = -0.8, gradient 0.
    # loss = -(2 * 1.2 - 2 - 2 * 0.8) / 6 = 0.2; dloss/dlogp = +1/6 on row 1, 0 elsewhere.
    logp_BT = torch.tensor([[LN2, 0.0], [0.1, -0.1], [-0.3, -0.5]], dtype=torch.float64, requires_grad=True)
    adv_B = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp_BT, torch.zeros(3, 2, dtype=torch.float64), None, adv_B, torch.ones(3, 2),
                          beta=0.0, sequence_ratio=True)
    assert loss.item() == pytest.approx(0.2, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[0, 0], [1 / 6, 1 / 6], [0, 0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert m["clip_high_count"].item() == 2 and m["clip_low_count"].item() == 2
    assert m["ratio_sum"].item() == pytest.approx(2 * math.sqrt(2) + 2 + 2 * math.exp(-0.4), abs=1e-6)


def test_sequence_ratio_with_per_token_advantages_is_gspo_token():
    # GSPO-token (Eq. 13-14): token t carries s_i with gradient s_i * A_t * dlogp_t. Row of log
    # ratios (0.1, -0.1): s = 1, A_t = (2, -1): l = (2, -1), loss -(2 - 1) / 2 = -0.5, dloss/dlogp =
    # -(2, -1) / 2 = (-1, 0.5). Broadcasting s's gradient over the row instead would give every
    # token (2 - 1) / 2 / 2 = 0.25, i.e. (-0.25, -0.25).
    logp_BT = torch.tensor([[0.1, -0.1]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp_BT, torch.zeros(1, 2, dtype=torch.float64), None,
                          torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.ones(1, 2), beta=0.0,
                          sequence_ratio=True)
    assert loss.item() == pytest.approx(-0.5, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-1.0, 0.5]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_delta_caps_a_runaway_ratio_with_negative_advantage():
    # A = -1, token ratios 3 and 1, eps 0.2.
    # Without delta: min(-3, -1.2) = -3 (gradient s * A = -3) and -1 (gradient -1):
    #   loss -(-3 - 1) / 2 = 2, dloss/dlogp = (1.5, 0.5).
    # delta = 2: min(min(3, 2) * -1, -1.2) = -2, capped, gradient 0; the s = 1 token is untouched:
    #   loss -(-2 - 1) / 2 = 1.5, dloss/dlogp = (0, 0.5).
    old_BT = torch.zeros(1, 2, dtype=torch.float64)
    adv_B = torch.tensor([-1.0], dtype=torch.float64)
    for delta, want_loss, want_grad in ((0.0, 2.0, [1.5, 0.5]), (2.0, 1.5, [0.0, 0.5])):
        logp_BT = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
        loss, m = policy_loss(logp_BT, old_BT, None, adv_B, torch.ones(1, 2), beta=0.0, delta=delta)
        assert loss.item() == pytest.approx(want_loss, abs=1e-15)
        loss.backward()
        torch.testing.assert_close(logp_BT.grad, torch.tensor([want_grad], dtype=torch.float64), rtol=0, atol=1e-15)
        assert m["clip_high_count"].item() == (1 if delta else 0)


def test_per_token_advantages_by_hand_and_garbage_under_the_mask_stays_out():
    # s = 1; A_t = (1, -1) on the two counted tokens, NaN under the mask: l = (1, -1), loss 0,
    # dloss/dlogp = -(1, -1) / 2 = (-0.5, 0.5, 0).
    logp_BT = torch.tensor([[-1.0, -2.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    adv_BT = torch.tensor([[1.0, -1.0, float("nan")]], dtype=torch.float64)
    loss, m = policy_loss(logp_BT, logp_BT.detach(), None, adv_BT, torch.tensor([[1, 1, 0]]), beta=0.0)
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-0.5, 0.5, 0.0]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert m["pg_sum"].item() == 0.0  # l = (1, -1): the NaN under the mask stays out of the metrics too


VARIANTS = {
    "dapo": {},
    "grpo": {"row_mean": True},
    "cispo": {"truncated_is": True},
    "gspo": {"sequence_ratio": True, "row_mean": True},
    "delta": {"delta": 1.5},
    "cispo_sequence": {"truncated_is": True, "sequence_ratio": True},
}


def _random_step(seed: int, B: int = 8, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    base_BT = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    old_BT = base_BT + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios that clip
    ref_BT = base_BT + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv_B = torch.randn(B, generator=g, dtype=torch.float64)
    mask_BT = torch.rand(B, T, generator=g) < 0.7
    mask_BT[:, 0] = True  # every row has a token (a rollout row always has its first token)
    off_B = torch.zeros(B, dtype=torch.bool)
    off_B[[3, 7]] = True
    return base_BT, old_BT, ref_BT, adv_B, mask_BT, off_B


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_row_advantages_broadcast_to_tokens_give_bit_identical_results(variant):
    base_BT, old_BT, ref_BT, adv_B, mask_BT, off_B = _random_step(2)
    out = []
    for adv in (adv_B, adv_B[:, None].expand_as(base_BT).clone()):
        x = base_BT.clone().requires_grad_()
        loss, m = policy_loss(x, old_BT, ref_BT, adv, mask_BT, off_policy_B=off_B, **VARIANTS[variant])
        loss.backward()
        out.append((loss, x.grad, m))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert all(torch.equal(out[0][2][k], out[1][2][k]) for k in out[0][2])


def paper_objective(logp, old, ref, adv, mask, off, *, variant, eps_low=0.2, eps_high=0.2, beta=0.02,
                    delta=1.5, max_len=None):
    """The loss (minus the objective) as the papers write it, one row and token at a time.

    dapo    DAPO (arXiv 2503.14476) Eq. 8: 1/sum|o_i| sum_i sum_t min(r A, clip(r) A), with the
            k3 KL term of the paper being reproduced (Elmakies et al. Eq. 3).
    grpo    DeepSeekMath (arXiv 2402.03300) Eq. 3: 1/G sum_i 1/|o_i| sum_t (min(...) - beta KL).
    dr_grpo Dr. GRPO (arXiv 2503.20783) Eq. 3 with its constant normaliser: 1/(G L_max) sum_i sum_t.
    gspo    GSPO (arXiv 2507.18071) Eq. 5 and 7: 1/G sum_i min(s_i A_i, clip(s_i) A_i),
            s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), the KL as in GRPO.
    cispo   MiniMax-M1 (arXiv 2506.13585) Eq. 4: 1/sum|o_i| sum_i sum_t sg(r_hat) A log pi,
            r_hat = clip(r, 1 - eps_low_IS, 1 + eps_high) with no lower bound, the KL as in DAPO.
    delta   INTELLECT-2 (arXiv 2505.07291): DAPO with min(min(r, delta) A, clip(r) A).
    MP-GRPO rows (off) use LUFFY's pi_theta * A, unclipped, in every token-level variant.
    """
    B, T = mask.shape
    rows = [[t for t in range(T) if mask[i, t]] for i in range(B)]
    n_tokens = sum(len(ts) for ts in rows)

    def kl(i, t):
        d = ref[i, t] - logp[i, t]
        return torch.exp(d) - d - 1.0

    total = logp.new_zeros(())
    for i, ts in enumerate(rows):
        row = logp.new_zeros(())
        if variant == "gspo":
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in ts) / len(ts))
            row = row + torch.minimum(s * adv[i], s.clamp(1 - eps_low, 1 + eps_high) * adv[i]) * len(ts)
        for t in ts:
            r = torch.exp(logp[i, t] - old[i, t])
            if variant == "gspo":
                term = logp.new_zeros(())
            elif off[i]:
                term = torch.exp(logp[i, t]) * adv[i]
            elif variant == "cispo":
                term = torch.clamp(r, max=1 + eps_high).detach() * adv[i] * logp[i, t]
            else:
                unclipped = torch.clamp(r, max=delta) if variant == "delta" else r
                term = torch.minimum(unclipped * adv[i], r.clamp(1 - eps_low, 1 + eps_high) * adv[i])
            row = row + term - beta * kl(i, t)
        if variant in ("grpo", "gspo"):
            total = total + row / len(ts) / B
        elif variant == "dr_grpo":
            total = total + row / (B * max_len)
        else:
            total = total + row / n_tokens
    return -total


@pytest.mark.parametrize("variant", ["dapo", "grpo", "dr_grpo", "gspo", "cispo", "delta"])
def test_each_variant_matches_the_papers_formula(variant):
    base_BT, old_BT, ref_BT, adv_B, mask_BT, off_B = _random_step(3)
    if variant == "gspo":
        off_B = torch.zeros_like(off_B)  # refused with MP-GRPO (config.validate)
    if variant == "dr_grpo":  # Dr. GRPO's advantage too: r - mean(group), no std (Sec. 3.1)
        rewards_PG = torch.rand(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        adv_B = group_advantages(rewards_PG, scale="none").flatten()
        for i in range(8):
            p = i // 4
            assert adv_B[i].item() == pytest.approx(rewards_PG[p, i % 4].item() - sum(rewards_PG[p].tolist()) / 4,
                                                    abs=1e-15)
    kw = {"dapo": {}, "grpo": {"row_mean": True}, "dr_grpo": {"denominator": 8 * 6}, "cispo": {"truncated_is": True},
          "gspo": {"sequence_ratio": True, "row_mean": True}, "delta": {"delta": 1.5}}[variant]
    # Sequence ratios average the token log ratios, so they stray less: a narrower range clips some.
    eps = 0.05 if variant == "gspo" else 0.2
    ours = base_BT.clone().requires_grad_()
    loss, m = policy_loss(ours, old_BT, ref_BT, adv_B, mask_BT, off_policy_B=off_B, eps_low=eps, eps_high=eps, **kw)
    loss.backward()
    theirs = base_BT.clone().requires_grad_()
    want = paper_objective(theirs, old_BT, ref_BT, adv_B, mask_BT, off_B, variant=variant, eps_low=eps,
                           eps_high=eps, max_len=6)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-13)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-13)
    assert ours.grad.abs().sum() > 0
    # Clipping (CISPO: truncation) is active on some tokens and not on others, so a wrong bound shows.
    assert 0 < m["clip_low_count"] + m["clip_high_count"] < m["on_policy_tokens"]


@pytest.mark.parametrize("variant", sorted(VARIANTS) + ["dr_grpo"])
def test_one_vs_four_micro_batches_same_gradient_for_every_global_normaliser(variant):
    # The loop counts the denominator once for the step (train.loss_denominators): tokens for
    # dapo, cispo, delta and token means; rows for grpo and gspo; rows x max_new_tokens for dr_grpo.
    base_BT, old_BT, ref_BT, adv_B, mask_BT, off_B = _random_step(4)
    kw = dict(VARIANTS.get(variant, {}))
    if variant == "dr_grpo":
        kw["denominator"] = 8 * 6
    elif kw.get("row_mean"):
        kw["denominator"] = 8
    else:
        kw["denominator"] = int(mask_BT.sum())
    if kw.get("sequence_ratio"):
        off_B = torch.zeros_like(off_B)
    adv_BT = adv_B[:, None] * torch.linspace(0.5, 1.5, 6, dtype=torch.float64)  # per-token advantages too
    for adv in (adv_B, adv_BT):
        full_BT = base_BT.clone().requires_grad_()
        loss, _ = policy_loss(full_BT, old_BT, ref_BT, adv, mask_BT, off_policy_B=off_B, **kw)
        loss.backward()
        micro_BT = base_BT.clone().requires_grad_()
        total = 0.0
        for rows in torch.arange(8).chunk(4):
            part, _ = policy_loss(micro_BT[rows], old_BT[rows], ref_BT[rows], adv[rows], mask_BT[rows],
                                  off_policy_B=off_B[rows], **kw)
            part.backward()
            total += part.item()
        assert total == pytest.approx(loss.item(), abs=1e-14)
        torch.testing.assert_close(micro_BT.grad, full_BT.grad, rtol=0, atol=1e-15)
        assert full_BT.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_off_policy_rows_keep_luffys_unclipped_term_under_every_variant(variant):
    # The off-policy test's row 0 (pi_phi = 1, A = 2, probs 0.25 and 0.5, old log-probs log 0.01
    # that would clip as ratios 25 and 50): dl/dlogp = exp(logp) * A = (0.5, 1.0) whatever the
    # variant, divided by 2 tokens (token normalisers) or by 1 row x 2 tokens (row means).
    logp_BT = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    old_BT = torch.full((1, 2), math.log(0.01), dtype=torch.float64)
    loss, m = policy_loss(logp_BT, old_BT, None, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2),
                          off_policy_B=torch.tensor([True]), beta=0.0, **VARIANTS[variant])
    assert loss.item() == pytest.approx(-(0.5 + 1.0) / 2, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-0.25, -0.5]], dtype=torch.float64), rtol=0, atol=1e-15)
    assert m["clip_low_count"].item() == 0 and m["clip_high_count"].item() == 0
