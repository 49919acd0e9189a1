"""Token log-probs from hidden states and the LM head, a chunk of rows at a time.

Full logits are N x V floats (8 x 200 tokens x 49160 vocab = 315 MB in fp32, about 1.2 GB of
working memory through log_softmax forward and backward). `token_logprobs` never holds more than
chunk_size x V of them: the forward keeps only one log-sum-exp per row, and the backward
recomputes each chunk's logits. Measured by `python -m grpo_speech bench logprobs`.
"""
from __future__ import annotations

import torch

# Rows of logits alive at once: chunk_size x V x 4 bytes (192 x 49160 -> 38 MB). Chosen with
# bench_logprobs on CPU at the Granite head shape (N = 1600, V = 49160): working memory under
# 10 % of full logits' at about their time. GPUs gain from larger chunks (1024 or more).
DEFAULT_CHUNK_SIZE = 192


def token_logprobs(
    hidden_BTH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log_softmax((hidden @ weight.T) / (logit_scale * temperature)) gathered at the targets.

    hidden_BTH: (..., H) hidden states (any leading shape, e.g. (B, T, H)).
    weight_VH:  (V, H) LM head; gradients flow into it when it requires grad (tied embeddings).
    targets_BT: (...) token ids, same leading shape as hidden. Ignore values (-100, ids >= V) are
                clamped into [0, V): their log-probs are meaningless and the caller masks them.
    logit_scale: what the model's forward divides its logits by (Granite's `logits_scaling`,
                 only if the installed model's forward applies it); temperature: the sampling one.
    Returns fp32 log-probs of shape targets_BT.shape. Computation is in fp32 whatever the input
    dtype; gradients come back in the inputs' dtypes.
    """
    H = hidden_BTH.shape[-1]
    if weight_VH.dim() != 2 or weight_VH.shape[1] != H:
        raise ValueError(f"weight_VH must be (V, {H}) to match hidden_BTH, got {tuple(weight_VH.shape)}")
    if tuple(hidden_BTH.shape[:-1]) != tuple(targets_BT.shape):
        raise ValueError(f"targets_BT shape {tuple(targets_BT.shape)} does not match hidden_BTH "
                         f"{tuple(hidden_BTH.shape)} without its last dim")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = float(logit_scale) * float(temperature)
    if not scale > 0:
        raise ValueError(f"logit_scale * temperature must be > 0, got {logit_scale} * {temperature}")
    targets_N = targets_BT.reshape(-1).long().clamp(0, weight_VH.shape[0] - 1)
    grad_on = torch.is_grad_enabled()
    logprobs_N = _ChunkedLogprobs.apply(
        hidden_BTH.reshape(-1, H), weight_VH, targets_N, 1.0 / scale, int(chunk_size),
        grad_on and hidden_BTH.requires_grad, grad_on and weight_VH.requires_grad,
    )
    return logprobs_N.view(targets_BT.shape)


def _logits_into(buf_cV: torch.Tensor, hidden_cH: torch.Tensor, weight32_VH: torch.Tensor,
                 inv_scale: float) -> torch.Tensor:
    # Reusing one buffer (out=) avoids paging in fresh chunk x V memory for every chunk.
    torch.mm(hidden_cH.float(), weight32_VH.t(), out=buf_cV)
    return buf_cV.mul_(inv_scale)


class _ChunkedLogprobs(torch.autograd.Function):
    """Two gradient paths.

    Weight needs a gradient: the backward recomputes each chunk's softmax p and forms
    grad_logits = g * (onehot - p) * inv_scale, then grad_hidden = grad_logits @ W and
    grad_W += grad_logits.T @ hidden (four N x H x V matmuls in all; full logits take three).

    Only hidden needs one (frozen or LoRA-only LM head): grad_hidden_n = g_n * d_n with
    d_n = (W[t_n] - p_n @ W) * inv_scale, an N x H tensor the forward computes while p is at
    hand, so the backward does no matmul (two matmuls in all, as many as full logits).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, inv_scale, chunk_size, hidden_grad, weight_grad):
        N = hidden_NH.shape[0]
        V = weight_VH.shape[0]
        weight32_VH = weight_VH.float()  # no copy for fp32; a transient fp32 copy for bf16/fp16
        logprobs_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        precompute = hidden_grad and not weight_grad
        lse_N = None if precompute else torch.empty_like(logprobs_N)
        d_NH = torch.empty(N, weight_VH.shape[1], dtype=torch.float32, device=hidden_NH.device) if precompute else None
        buf = torch.empty(min(chunk_size, N), V, dtype=torch.float32, device=hidden_NH.device)
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            t_c = targets_N[i:j]
            logits_cV = _logits_into(buf[: j - i], hidden_NH[i:j], weight32_VH, inv_scale)
            target_c = logits_cV.gather(1, t_c[:, None])[:, 0]
            max_c = logits_cV.amax(dim=1)
            probs_cV = logits_cV.sub_(max_c[:, None]).exp_()  # in place: one chunk buffer only
            sum_c = probs_cV.sum(dim=1)
            lse_c = max_c + sum_c.log()
            logprobs_N[i:j] = target_c - lse_c
            if precompute:
                probs_cV.div_(sum_c[:, None])
                d_NH[i:j] = (weight32_VH.index_select(0, t_c) - probs_cV @ weight32_VH) * inv_scale
            else:
                lse_N[i:j] = lse_c
        ctx.inv_scale, ctx.chunk_size = inv_scale, chunk_size
        ctx.hidden_grad, ctx.weight_grad, ctx.precompute = hidden_grad, weight_grad, precompute
        ctx.hidden_dtype = hidden_NH.dtype
        if precompute:
            ctx.save_for_backward(d_NH)
        elif hidden_grad or weight_grad:
            ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        return logprobs_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        grad_N = grad_N.float()
        if ctx.precompute:
            (d_NH,) = ctx.saved_tensors
            return (grad_N[:, None] * d_NH).to(ctx.hidden_dtype), None, None, None, None, None, None
        if not (ctx.hidden_grad or ctx.weight_grad):
            return None, None, None, None, None, None, None
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        inv_scale, chunk_size = ctx.inv_scale, ctx.chunk_size
        N, V = hidden_NH.shape[0], weight_VH.shape[0]
        weight32_VH = weight_VH.float()
        grad_hidden_NH = torch.empty(N, weight_VH.shape[1], dtype=torch.float32, device=hidden_NH.device) if ctx.hidden_grad else None
        grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if ctx.weight_grad else None
        buf = torch.empty(min(chunk_size, N), V, dtype=torch.float32, device=hidden_NH.device)
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            g_c = grad_N[i:j]
            h_cH = hidden_NH[i:j].float()
            logits_cV = _logits_into(buf[: j - i], h_cH, weight32_VH, inv_scale)
            # grad_logits = g * (onehot - p) * inv_scale, built in place in the logits buffer.
            grad_cV = logits_cV.sub_(lse_N[i:j, None]).exp_().mul_((-g_c * inv_scale)[:, None])
            grad_cV.scatter_add_(1, targets_N[i:j, None], (g_c * inv_scale)[:, None])
            if grad_hidden_NH is not None:
                torch.mm(grad_cV, weight32_VH, out=grad_hidden_NH[i:j])
            if grad_weight_VH is not None:
                grad_weight_VH.addmm_(grad_cV.t(), h_cH)
        grad_hidden = grad_hidden_NH.to(hidden_NH.dtype) if grad_hidden_NH is not None else None
        grad_weight = grad_weight_VH.to(weight_VH.dtype) if grad_weight_VH is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None
