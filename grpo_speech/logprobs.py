"""Token log-probs from hidden states and the LM head, never holding all N x V logits.

Full logits are N x V floats (8 x 200 tokens x 49160 vocab = 315 MB in fp32, up to three such
buffers alive through log_softmax forward and backward). `token_logprobs` holds at most
chunk_size x V of them, as one tile of rows x vocabulary columns: the forward keeps one
log-sum-exp per row (accumulated online over vocabulary blocks) and the backward recomputes each
tile's logits. On CUDA the same contract is met by a Triton kernel (logprobs_triton.py); this
function stays the CPU path and the reference. Measured by `python -m grpo_speech bench logprobs`.
"""
from __future__ import annotations

import torch

# Logits alive at once, in rows of the full vocabulary: chunk_size x V x 4 bytes (64 x 49160 ->
# 12.6 MB). Chosen with `bench logprobs` on CPU at N = 1600, V = 49160, H = 2048 and 4096: working
# memory under 10 % of full logits' for both; 192 was 9 % faster but 15 % of full logits' memory
# at H = 4096. GPUs have room for more (e.g. 1024). The one default: model.logprob_chunk_size and
# sequence_logprobs take this value.
DEFAULT_CHUNK_SIZE = 64
# Rows per tile at most. Tiles span all rows of a micro-batch (up to this) and as many vocabulary
# columns as the budget allows: a tall tile keeps every matmul large in two dimensions (on CPU, 192
# rows x 49160 columns ran 25 % slower per FLOP than 1600 x 5900), and each block of grad_W is
# written once per row tile instead of once per small row chunk.
MAX_TILE_ROWS = 2048
# Tiles hold at least this many logits (4 MB): small vocabularies (the tiny model's few hundred
# tokens) then take one block per row tile, instead of many blocks too thin for a fast matmul.
MIN_TILE_ELEMENTS = 2**20


def token_logprobs(
    hidden_BTH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """log_softmax((hidden @ weight.T) / (logit_scale * temperature)) gathered at the targets.

    hidden_BTH: (..., H) hidden states (any leading shape, e.g. (B, T, H)).
    weight_VH:  (V, H) LM head; gradients flow into it when it requires grad (tied embeddings).
    targets_BT: (...) token ids, same leading shape as hidden. Ignore values (-100, ids >= V) are
                clamped into [0, V): their log-probs are meaningless and the caller masks them.
    logit_scale: what the model's forward divides its logits by (Granite's `logits_scaling`,
                 only if the installed model's forward applies it); temperature: the sampling one.
    chunk_size: logits held at once, counted in rows of the full vocabulary (memory
                chunk_size x V x 4 bytes); tiles are up to MAX_TILE_ROWS rows by the columns that fit.
    backend: "auto" (Triton for bf16/fp16 CUDA tensors when triton imports, else chunked), "chunked" or
             "triton" (forced; on CPU it needs TRITON_INTERPRET=1 set before triton is imported).
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
    if backend not in ("auto", "chunked", "triton"):
        raise ValueError(f"backend must be auto, chunked or triton, got {backend!r}")
    targets_N = targets_BT.reshape(-1).long().clamp(0, weight_VH.shape[0] - 1)
    grad_on = torch.is_grad_enabled()
    # Triton on CUDA for 16-bit inputs of one dtype (the training case); fp32 or mixed inputs stay
    # on cuBLAS through the chunked path (an fp32 Triton dot is exact but runs on CUDA cores).
    fused = (hidden_BTH.is_cuda and hidden_BTH.dtype in (torch.bfloat16, torch.float16)
             and weight_VH.dtype == hidden_BTH.dtype and _triton_available())
    if backend == "triton" or (backend == "auto" and fused):
        from grpo_speech.logprobs_triton import triton_token_logprobs

        logprobs_N = triton_token_logprobs(
            hidden_BTH.reshape(-1, H), weight_VH, targets_N, 1.0 / scale,
            grad_on and hidden_BTH.requires_grad, grad_on and weight_VH.requires_grad,
        )
        return logprobs_N.view(targets_BT.shape)
    logprobs_N = _ChunkedLogprobs.apply(
        hidden_BTH.reshape(-1, H), weight_VH, targets_N, 1.0 / scale, int(chunk_size),
        grad_on and hidden_BTH.requires_grad, grad_on and weight_VH.requires_grad,
    )
    return logprobs_N.view(targets_BT.shape)


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401  (ships with CUDA builds of torch)
            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def _tiles(N: int, V: int, chunk_size: int) -> tuple[int, int]:
    rows = min(N, MAX_TILE_ROWS)
    cols = max(1, min(V, -(-max(chunk_size * V, MIN_TILE_ELEMENTS) // rows)))
    return rows, cols


class _ChunkedLogprobs(torch.autograd.Function):
    """Tiles of rows x vocabulary columns; two gradient paths.

    Weight needs a gradient: the forward keeps one log-sum-exp per row; the backward recomputes
    each tile's logits, forms grad_logits = g * (onehot - p) * inv_scale with p = exp(logits - lse),
    then grad_hidden += grad_logits @ W_block and grad_W_block += grad_logits.T @ hidden (four
    N x H x V matmuls in all; full logits take three).

    Only hidden needs one (frozen or LoRA-only LM head): grad_hidden_n = g_n * d_n with
    d_n = (W[t_n] - p_n @ W) * inv_scale, an N x H tensor the forward accumulates online with the
    log-sum-exp, so the backward does no matmul (two matmuls in all, as many as full logits).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, inv_scale, chunk_size, hidden_grad, weight_grad):
        N, V, H = hidden_NH.shape[0], weight_VH.shape[0], weight_VH.shape[1]
        dev = hidden_NH.device
        weight32_VH = weight_VH.float()  # no copy for fp32; a transient fp32 copy for bf16/fp16
        precompute = hidden_grad and not weight_grad
        logprobs_N = torch.empty(N, dtype=torch.float32, device=dev)
        lse_N = torch.empty(N, dtype=torch.float32, device=dev)
        d_NH = torch.empty(N, H, dtype=torch.float32, device=dev) if precompute else None
        rows, cols = _tiles(N, V, chunk_size)
        buf = torch.empty(rows * cols, dtype=torch.float32, device=dev)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            h_rH, t_r = hidden_NH[i:j].float(), targets_N[i:j]
            # Online log-sum-exp over vocabulary blocks: running max m, sum s of exp(logit - m),
            # and (frozen head) e = sum of exp(logit - m) * W row, rescaled when m grows.
            m_r = torch.full((j - i,), float("-inf"), dtype=torch.float32, device=dev)
            s_r = torch.zeros(j - i, dtype=torch.float32, device=dev)
            target_r = torch.zeros(j - i, dtype=torch.float32, device=dev)
            e_rH = torch.zeros(j - i, H, dtype=torch.float32, device=dev) if precompute else None
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                w_bH = weight32_VH[v0:v1]
                logits_rb = torch.mm(h_rH, w_bH.t(), out=buf[: (j - i) * (v1 - v0)].view(j - i, v1 - v0))
                logits_rb.mul_(inv_scale)
                in_block_r = (t_r >= v0) & (t_r < v1)
                picked_r = logits_rb.gather(1, (t_r - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
                target_r = torch.where(in_block_r, picked_r, target_r)
                m_new_r = torch.maximum(m_r, logits_rb.amax(dim=1))
                rescale_r = torch.exp(m_r - m_new_r)  # 0 on the first block (m = -inf)
                p_rb = logits_rb.sub_(m_new_r[:, None]).exp_()  # in place: one tile buffer only
                s_r = s_r * rescale_r + p_rb.sum(dim=1)
                if precompute:
                    e_rH.mul_(rescale_r[:, None]).addmm_(p_rb, w_bH)
                m_r = m_new_r
            lse_N[i:j] = m_r + s_r.log()
            logprobs_N[i:j] = target_r - lse_N[i:j]
            if precompute:
                d_NH[i:j] = (weight32_VH.index_select(0, t_r) - e_rH / s_r[:, None]) * inv_scale
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
        inv_scale = ctx.inv_scale
        N, V, H = hidden_NH.shape[0], weight_VH.shape[0], weight_VH.shape[1]
        dev = hidden_NH.device
        weight32_VH = weight_VH.float()
        grad_hidden_NH = torch.zeros(N, H, dtype=torch.float32, device=dev) if ctx.hidden_grad else None
        grad_weight_VH = torch.empty(V, H, dtype=torch.float32, device=dev) if ctx.weight_grad else None
        rows, cols = _tiles(N, V, ctx.chunk_size)
        buf = torch.empty(rows * cols, dtype=torch.float32, device=dev)
        gs_N1 = (grad_N * inv_scale)[:, None]
        for i in range(0, N, rows):
            j = min(i + rows, N)
            h_rH, t_r, gs_r1 = hidden_NH[i:j].float(), targets_N[i:j], gs_N1[i:j]
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                w_bH = weight32_VH[v0:v1]
                logits_rb = torch.mm(h_rH, w_bH.t(), out=buf[: (j - i) * (v1 - v0)].view(j - i, v1 - v0))
                # grad_logits = g * (onehot - p) * inv_scale, built in place in the tile buffer.
                grad_rb = logits_rb.mul_(inv_scale).sub_(lse_N[i:j, None]).exp_().mul_(-gs_r1)
                in_block_r1 = ((t_r >= v0) & (t_r < v1))[:, None]
                cols_r1 = (t_r - v0).clamp(0, v1 - v0 - 1)[:, None]
                grad_rb.scatter_add_(1, cols_r1, torch.where(in_block_r1, gs_r1, 0.0))
                if grad_hidden_NH is not None:
                    grad_hidden_NH[i:j].addmm_(grad_rb, w_bH)
                if grad_weight_VH is not None:
                    if i == 0:  # first row tile writes the block, later ones add to it
                        torch.mm(grad_rb.t(), h_rH, out=grad_weight_VH[v0:v1])
                    else:
                        grad_weight_VH[v0:v1].addmm_(grad_rb.t(), h_rH)
        grad_hidden = grad_hidden_NH.to(hidden_NH.dtype) if grad_hidden_NH is not None else None
        grad_weight = grad_weight_VH.to(weight_VH.dtype) if grad_weight_VH is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None
