"""GRPO math as pure tensor functions: group advantages (Eq. 1), the k3 KL, the DAPO token loss
(Eq. 2-3) with the MP-GRPO off-policy row, and the SFT loss. The published variants researchers
compare against (Dr. GRPO, GSPO, CISPO, INTELLECT-2's two-sided clip, per-sequence and per-batch
normalisers, reward scaling, per-token advantages) are parameters of the same two functions.

Nothing here samples, logs or touches a model. Every loss divides by an explicit count: the
training loop counts completion tokens (or rows) once per optimiser step over all micro-batches
and ranks and passes that count, so summing micro-batch gradients gives the full-batch gradient.
"""
from __future__ import annotations

import torch


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-4, *, scale: str = "group",
                     batch_std: float | torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1: A = (r - mean(group)) / (std(group) + eps), one group per row.

    rewards_PG: (P, G) rewards, row p holds the G samples of prompt p.
    std is the unbiased sample std (torch.std's default). A group whose rewards are all equal,
    and a group of one, gets exactly 0: with equal rewards the float mean can differ from them by
    one ulp, which eps would otherwise turn into a small non-zero advantage.

    scale (grpo.scale_rewards) picks what divides r - mean(group):
      group  the group's std (Eq. 1, the paper's);
      batch  `batch_std`, the std of every reward of the optimiser step (the loop reduces it over
             ranks; None: the std of rewards_PG, the whole batch of one process). A group whose
             rewards barely differ is no longer blown up to unit scale;
      none   nothing (Dr. GRPO, arXiv 2503.20783 Sec. 3.1: dividing by the group std weights
             easy and hard prompts more than the others).
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards_PG must be (P, G), got shape {tuple(rewards_PG.shape)}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    bad_P = ~torch.isfinite(rewards_PG).all(dim=1)
    if bad_P.any():
        raise ValueError(f"rewards_PG has non-finite values in rows {bad_P.nonzero().flatten().tolist()}")
    if rewards_PG.shape[1] < 2:
        return torch.zeros_like(rewards_PG)
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    constant_P1 = (rewards_PG == rewards_PG[:, :1]).all(dim=1, keepdim=True)
    if scale == "group":
        std_P1 = rewards_PG.std(dim=1, keepdim=True)
        advantages_PG = (rewards_PG - mean_P1) / (std_P1 + eps)
    elif scale == "batch":
        std = rewards_PG.std() if batch_std is None else torch.as_tensor(batch_std, dtype=rewards_PG.dtype)
        advantages_PG = (rewards_PG - mean_P1) / (std.to(rewards_PG.device) + eps)
    else:
        advantages_PG = rewards_PG - mean_P1
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
        if name == "advantages":
            if tuple(x.shape) not in ((B,), (B, T)):
                raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}) to match mask_BT, "
                                 f"got {tuple(x.shape)}")
            continue
        want = (B,) if name.endswith("_B") else (B, T)
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want} to match mask_BT, got {tuple(x.shape)}")


def _on_policy_objective(logp_BT, old_BT, adv_BT, mask_BT, *, eps_low: float, eps_high: float, delta: float,
                         sequence_ratio: bool, truncated_is: bool):
    """(ratio s, per-token objective l, lower-clip mask, upper-clip mask), each (B, T), of
    policy_loss's on-policy rows.

    On-policy rows (Eq. 2): l = min(s*A, clip(s, 1-eps_low, 1+eps_high)*A), s = exp(logp - old).
    The variants of grpo.loss_type, grpo.importance_sampling and grpo.delta (config.py), each a
    parameter:
      delta > 0       INTELLECT-2's two-sided clip: l = min(min(s, delta)*A, clip(s)*A), which
                      bounds the step on a token with A < 0 whose ratio has run away (0: off).
      sequence_ratio  GSPO (arXiv 2507.18071, Eq. 7): one ratio per row,
                      s_i = exp(mean_t(logp - old)) over its masked tokens, clipped as one. It is
                      used in GSPO-token form (Eq. 13): every token carries the value s_i and the
                      gradient s_i * dlogp_t, so with one advantage per row the gradient is
                      GSPO's (Eq. 10) and (B, T) advantages act token by token.
      truncated_is    CISPO (arXiv 2506.13585, Eq. 4-5): l = sg(min(s, 1+eps_high)) * A * logp.
                      The weight is truncated, no token's gradient is dropped; no lower bound (the
                      paper's choice), eps_low and delta are unused. Its loss value is not a
                      surrogate's value; its gradient is the comparable quantity.
      row_mean        each row's token mean first, then the sum over rows / denominator (the rows
                      of the step): GRPO's per-sequence mean (DeepSeekMath, Eq. 3).
    """
    log_ratio_BT = logp_BT - old_BT
    if sequence_ratio:
        n_B1 = mask_BT.sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio_BT = (log_ratio_BT.sum(dim=1, keepdim=True) / n_B1).detach() + (logp_BT - logp_BT.detach())
    ratio_BT = torch.exp(log_ratio_BT)
    if truncated_is:
        weight_BT = ratio_BT.clamp(max=1.0 + eps_high).detach()
        return ratio_BT, weight_BT * adv_BT * logp_BT, torch.zeros_like(mask_BT), ratio_BT > 1.0 + eps_high
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    capped_BT = ratio_BT.clamp(max=delta) if delta > 0 else ratio_BT
    pg_BT = torch.minimum(capped_BT * adv_BT, clipped_BT * adv_BT)
    low_BT = (adv_BT < 0) & (ratio_BT < 1.0 - eps_low)
    high_BT = (adv_BT > 0) & (ratio_BT > 1.0 + eps_high)
    if delta > 0:
        high_BT = high_BT | ((adv_BT < 0) & (ratio_BT > delta))
    return ratio_BT, pg_BT, low_BT, high_BT


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor | None,
    advantages: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    off_policy_B: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.02,
    delta: float = 0.0,
    sequence_ratio: bool = False,
    truncated_is: bool = False,
    row_mean: bool = False,
    denominator: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3: loss = -sum_masked(l - beta * kl) / denominator; the defaults are the paper's loss.

    logprobs_BT:      (B, T) completion-token log-probs under the policy being trained.
    old_logprobs_BT:  (B, T) the same under the policy that sampled the rollout (detached here).
    ref_logprobs_BT:  (B, T) the same under the frozen reference (detached here); None if beta == 0.
    advantages:       (B,) one advantage per row, or (B, T) one per token (detached here). A (B,)
                      tensor gives bit for bit what the same values broadcast to (B, T) give. The
                      (B, T) form is the hook for per-token credit: a rule that scores spans of a
                      completion (LEAF-style) hands its advantages here, aligned with mask_BT.
    mask_BT:          (B, T) 1 on completion tokens that count, 0 on prompt and padding.
    off_policy_B:     (B,) True on MP-GRPO reference rows: pi_phi = 1, so l = exp(logp) * A,
                      never clipped (LUFFY), whatever the variant below. None: every row is
                      on-policy.
    denominator:      what divides the sum; defaults to mask_BT.sum() (row_mean: the rows with a
                      masked token). The loop passes a count over all micro-batches and ranks of
                      one optimiser step (train.loss_denominators): completion tokens for the
                      paper's loss.

    On-policy rows (Eq. 2): l = min(s*A, clip(s, 1-eps_low, 1+eps_high)*A), s = exp(logp - old),
    or a variant of it (delta, sequence_ratio, truncated_is, row_mean: _on_policy_objective).
    Returns (loss, metrics): raw sums and counts (_metrics).
    """
    _check_shapes(mask_BT, logprobs_BT=logprobs_BT, old_logprobs_BT=old_logprobs_BT,
                  ref_logprobs_BT=ref_logprobs_BT, advantages=advantages, off_policy_B=off_policy_B)
    if ref_logprobs_BT is None and beta != 0:
        raise ValueError(f"ref_logprobs_BT is None but beta = {beta}; pass reference log-probs or set beta = 0")
    mask_BT = mask_BT.bool()
    zero = logprobs_BT.new_zeros(())
    # Masked positions may hold garbage (-inf log-probs of pad tokens); zero them before exp so
    # that no inf or NaN reaches the sum or its gradient.
    logp_BT = torch.where(mask_BT, logprobs_BT, zero)
    old_BT = torch.where(mask_BT, old_logprobs_BT.detach(), zero)
    adv_BT = advantages.detach().to(logp_BT.dtype)  # (B, 1) broadcasts over tokens, or (B, T)
    adv_BT = adv_BT[:, None] if adv_BT.dim() == 1 else torch.where(mask_BT, adv_BT, zero)

    ratio_BT, pg_BT, low_BT, high_BT = _on_policy_objective(
        logp_BT, old_BT, adv_BT, mask_BT, eps_low=eps_low, eps_high=eps_high, delta=delta,
        sequence_ratio=sequence_ratio, truncated_is=truncated_is)
    if off_policy_B is None:
        off_B1 = torch.zeros_like(mask_BT[:, :1])
    else:
        off_B1 = off_policy_B.bool()[:, None]
        pg_BT = torch.where(off_B1, torch.exp(logp_BT) * adv_BT, pg_BT)

    if ref_logprobs_BT is None:
        kl_BT = torch.zeros_like(logp_BT)
    else:
        ref_BT = torch.where(mask_BT, ref_logprobs_BT.detach(), zero)
        kl_BT = kl_k3(logp_BT, ref_BT)

    per_token_BT = torch.where(mask_BT, pg_BT - beta * kl_BT, zero)
    rows_B = mask_BT.any(dim=1)
    if row_mean:
        total = (per_token_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)).sum()
        loss = -total / _denominator(denominator, rows_B)
    else:
        loss = -per_token_BT.sum() / _denominator(denominator, mask_BT)

    return loss, _metrics(mask_BT, off_B1, low_BT, high_BT, ratio_BT, logp_BT, kl_BT, pg_BT)


@torch.no_grad()
def _metrics(mask_BT, off_B1, low_BT, high_BT, ratio_BT, logp_BT, kl_BT, pg_BT) -> dict[str, torch.Tensor]:
    """policy_loss's metrics.

    Returned metrics are detached 0-d float32 tensors, raw sums and counts only: the loop sums
    them over micro-batches, passes and ranks, and log.step_record divides once.
      tokens             masked tokens
      on_policy_tokens   masked tokens of on-policy rows
      off_policy_tokens  masked tokens of off-policy rows
      clip_low_count     on-policy tokens where the lower clip changes the objective (A<0, s<1-eps_low)
      clip_high_count    on-policy tokens where the upper clip changes the objective (A>0, s>1+eps_high;
                         with delta also A<0, s>delta; CISPO: every token whose weight is truncated)
      ratio_sum          sum of s over on-policy tokens
      off_policy_prob_sum  sum of exp(logp) over off-policy tokens
      kl_sum             sum of the k3 KL over masked tokens (0 when ref is None)
      pg_sum             sum of l over masked tokens
    """
    zero = logp_BT.new_zeros(())
    on_BT = mask_BT & ~off_B1
    off_BT = mask_BT & off_B1
    f = lambda x: x.sum().to(torch.float32)  # noqa: E731
    return {
        "tokens": f(mask_BT),
        "on_policy_tokens": f(on_BT),
        "off_policy_tokens": f(off_BT),
        "clip_low_count": f(on_BT & low_BT),
        "clip_high_count": f(on_BT & high_BT),
        "ratio_sum": f(torch.where(on_BT, ratio_BT, zero)),
        "off_policy_prob_sum": f(torch.where(off_BT, torch.exp(logp_BT), zero)),
        "kl_sum": f(torch.where(mask_BT, kl_BT, zero)),
        "pg_sum": f(torch.where(mask_BT, pg_BT, zero)),
    }


def sft_loss(
    logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood of the reference answer (the SFT baseline).

    logprobs_BT: (B, T) log-probs of the target tokens; mask_BT: (B, T) 1 on answer tokens.
    num_tokens as policy_loss's denominator. Metrics (raw): tokens and nll_sum.
    """
    _check_shapes(mask_BT, logprobs_BT=logprobs_BT)
    mask_BT = mask_BT.bool()
    nll_BT = torch.where(mask_BT, -logprobs_BT, logprobs_BT.new_zeros(()))
    loss = nll_BT.sum() / _denominator(num_tokens, mask_BT)
    with torch.no_grad():
        metrics = {"tokens": mask_BT.sum().to(torch.float32), "nll_sum": nll_BT.sum().to(torch.float32)}
    return loss, metrics
