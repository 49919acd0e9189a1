"""GRPO math as pure tensor functions: group advantages (Eq. 1), the k3 KL, the DAPO token loss
(Eq. 2-3) with the MP-GRPO off-policy row, and the SFT loss.

Nothing here samples, logs or touches a model. Every loss divides by an explicit `num_tokens`:
the training loop counts completion tokens once per optimiser step over all micro-batches and
ranks and passes that count, so summing micro-batch gradients gives the full-batch gradient.
"""
from __future__ import annotations

import torch


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 1: A = (r - mean(group)) / (std(group) + eps), one group per row.

    rewards_PG: (P, G) rewards, row p holds the G samples of prompt p.
    std is the unbiased sample std (torch.std's default). A group whose rewards are all equal,
    and a group of one, gets exactly 0: with equal rewards the float mean can differ from them by
    one ulp, which eps would otherwise turn into a small non-zero advantage.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards_PG must be (P, G), got shape {tuple(rewards_PG.shape)}")
    bad_P = ~torch.isfinite(rewards_PG).all(dim=1)
    if bad_P.any():
        raise ValueError(f"rewards_PG has non-finite values in rows {bad_P.nonzero().flatten().tolist()}")
    if rewards_PG.shape[1] < 2:
        return torch.zeros_like(rewards_PG)
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    std_P1 = rewards_PG.std(dim=1, keepdim=True)
    constant_P1 = (rewards_PG == rewards_PG[:, :1]).all(dim=1, keepdim=True)
    advantages_PG = (rewards_PG - mean_P1) / (std_P1 + eps)
    return torch.where(constant_P1, torch.zeros_like(advantages_PG), advantages_PG)


def kl_k3(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = ref - logp.

    Non-negative, and an unbiased estimate of the KL for tokens sampled from pi_theta.
    """
    d_BT = ref_logprobs_BT - logprobs_BT
    return torch.exp(d_BT) - d_BT - 1.0


def _denominator(num_tokens, mask_BT: torch.Tensor) -> torch.Tensor:
    # An empty batch (all-zero mask, or a rank whose micro-batch holds no tokens) divides a zero
    # sum by 1, giving 0 and zero gradients instead of NaN.
    if num_tokens is None:
        num_tokens = mask_BT.sum()
    n = torch.as_tensor(num_tokens, dtype=torch.float32, device=mask_BT.device)
    return n.clamp(min=1.0)


def _check_shapes(mask_BT: torch.Tensor, **tensors) -> None:
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be (B, T), got shape {tuple(mask_BT.shape)}")
    B, T = mask_BT.shape
    for name, x in tensors.items():
        if x is None:
            continue
        want = (B,) if name.endswith("_B") else (B, T)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match mask_BT, got {tuple(x.shape)}")


def dapo_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor | None,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    off_policy_B: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.02,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3: loss = -sum_masked(l - beta * kl) / num_tokens.

    logprobs_BT:      (B, T) completion-token log-probs under the policy being trained.
    old_logprobs_BT:  (B, T) the same under the policy that sampled the rollout (detached here).
    ref_logprobs_BT:  (B, T) the same under the frozen reference (detached here); None if beta == 0.
    advantages_B:     (B,) one advantage per row (detached here).
    mask_BT:          (B, T) 1 on completion tokens that count, 0 on prompt and padding.
    off_policy_B:     (B,) True on MP-GRPO reference rows: pi_phi = 1, so l = exp(logp) * A,
                      never clipped (LUFFY). None: every row is on-policy.
    num_tokens:       the token count that divides the sum; defaults to mask_BT.sum(). The loop
                      passes the count over all micro-batches and ranks of one optimiser step.

    On-policy rows (Eq. 2): l = min(s*A, clip(s, 1-eps_low, 1+eps_high)*A), s = exp(logp - old).

    Returned metrics are detached 0-d float32 tensors, raw sums and counts only: the loop sums
    them over micro-batches, passes and ranks, and log.step_record divides once.
      tokens             masked tokens
      on_policy_tokens   masked tokens of on-policy rows
      off_policy_tokens  masked tokens of off-policy rows
      clip_low_count     on-policy tokens where the lower clip changes the objective (A<0, s<1-eps_low)
      clip_high_count    on-policy tokens where the upper clip changes the objective (A>0, s>1+eps_high)
      ratio_sum          sum of s over on-policy tokens
      off_policy_prob_sum  sum of exp(logp) over off-policy tokens
      kl_sum             sum of the k3 KL over masked tokens (0 when ref is None)
      pg_sum             sum of l over masked tokens
      advantage_sum      sum of A over rows with at least one masked token
      rows               rows with at least one masked token
    """
    _check_shapes(mask_BT, logprobs_BT=logprobs_BT, old_logprobs_BT=old_logprobs_BT,
                  ref_logprobs_BT=ref_logprobs_BT, advantages_B=advantages_B, off_policy_B=off_policy_B)
    if ref_logprobs_BT is None and beta != 0:
        raise ValueError(f"ref_logprobs_BT is None but beta = {beta}; pass reference log-probs or set beta = 0")
    mask_BT = mask_BT.bool()
    zero = logprobs_BT.new_zeros(())
    # Masked positions may hold garbage (-inf log-probs of pad tokens); zero them before exp so
    # that no inf or NaN reaches the sum or its gradient.
    logp_BT = torch.where(mask_BT, logprobs_BT, zero)
    old_BT = torch.where(mask_BT, old_logprobs_BT.detach(), zero)
    adv_B1 = advantages_B.detach().to(logp_BT.dtype)[:, None]

    ratio_BT = torch.exp(logp_BT - old_BT)
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_BT = torch.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    if off_policy_B is None:
        off_B1 = torch.zeros_like(mask_BT[:, :1])
    else:
        off_B1 = off_policy_B.bool()[:, None]
        pg_BT = torch.where(off_B1, torch.exp(logp_BT) * adv_B1, pg_BT)

    if ref_logprobs_BT is None:
        kl_BT = torch.zeros_like(logp_BT)
    else:
        ref_BT = torch.where(mask_BT, ref_logprobs_BT.detach(), zero)
        kl_BT = kl_k3(logp_BT, ref_BT)

    per_token_BT = torch.where(mask_BT, pg_BT - beta * kl_BT, zero)
    loss = -per_token_BT.sum() / _denominator(num_tokens, mask_BT)

    with torch.no_grad():
        on_BT = mask_BT & ~off_B1
        off_BT = mask_BT & off_B1
        rows_B = mask_BT.any(dim=1)
        f = lambda x: x.sum().to(torch.float32)  # noqa: E731
        m = {
            "tokens": f(mask_BT),
            "on_policy_tokens": f(on_BT),
            "off_policy_tokens": f(off_BT),
            "clip_low_count": f(on_BT & (adv_B1 < 0) & (ratio_BT < 1.0 - eps_low)),
            "clip_high_count": f(on_BT & (adv_B1 > 0) & (ratio_BT > 1.0 + eps_high)),
            "ratio_sum": f(torch.where(on_BT, ratio_BT, zero)),
            "off_policy_prob_sum": f(torch.where(off_BT, torch.exp(logp_BT), zero)),
            "kl_sum": f(torch.where(mask_BT, kl_BT, zero)),
            "pg_sum": f(torch.where(mask_BT, pg_BT, zero)),
            "advantage_sum": f(torch.where(rows_B, adv_B1[:, 0], zero)),
            "rows": f(rows_B),
        }
    return loss, m


def sft_loss(
    logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood of the reference answer (the SFT baseline).

    logprobs_BT: (B, T) log-probs of the target tokens; mask_BT: (B, T) 1 on answer tokens.
    num_tokens as in dapo_loss. Metrics (raw): tokens and nll_sum.
    """
    _check_shapes(mask_BT, logprobs_BT=logprobs_BT)
    mask_BT = mask_BT.bool()
    nll_BT = torch.where(mask_BT, -logprobs_BT, logprobs_BT.new_zeros(()))
    loss = nll_BT.sum() / _denominator(num_tokens, mask_BT)
    with torch.no_grad():
        metrics = {"tokens": mask_BT.sum().to(torch.float32), "nll_sum": nll_BT.sum().to(torch.float32)}
    return loss, metrics
