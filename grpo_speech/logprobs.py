"""Token log-probs from hidden states and the LM head, never holding all N x V logits.

Full logits are N x V floats (8 x 200 tokens x 49160 vocab = 315 MB in fp32, up to three such
buffers alive through log_softmax forward and backward). `token_logprobs` computes them in chunks
of rows x vocabulary columns: the forward keeps one log-sum-exp per row (accumulated online over
its chunks) and the backward recomputes each chunk's logits. One autograd function,
`ChunkedLogprobs`, owns the loops over chunks, the saved tensors and the gradient matmuls; the
per-chunk compute plugs in: `EagerChunks` here (fp32 PyTorch ops, the CPU path and the
reference) or the Triton kernels of logprobs_triton.py (16-bit CUDA tensors). Shapes: N rows
(tokens), H hidden, V vocabulary, R rows and C vocabulary columns of one chunk. Measured by
`python -m grpo_speech bench logprobs`.
"""
from __future__ import annotations

import torch

from grpo_speech.distributed import ceil_div

# Logits alive at once, in rows of the full vocabulary: chunk_size x V x 4 bytes (64 x 49160 ->
# 12.6 MB). Chosen with `bench logprobs` on CPU at N = 1600, V = 49160, H = 2048 and 4096: working
# memory under 10 % of full logits' for both; 192 was 9 % faster but 15 % of full logits' memory
# at H = 4096. GPUs have room for more (e.g. 1024). The one default: model.logprob_chunk_size and
# sequence_logprobs take this value.
DEFAULT_CHUNK_SIZE = 64
# Rows per chunk at most. Chunks span all rows of a micro-batch (up to this) and as many vocabulary
# columns as the budget allows: a tall chunk keeps every matmul large in two dimensions (on CPU,
# 192 rows x 49160 columns ran 25 % slower per FLOP than 1600 x 5900), and each block of grad_W is
# written once per row chunk instead of once per small row chunk. The Triton forward that keeps
# only the log-sum-exp takes as many rows per launch: its per-tile (max, sum) partials are then
# MAX_CHUNK_ROWS x V / BLOCK_C x 8 bytes (3 MB at V = 49160).
MAX_CHUNK_ROWS = 2048
# Eager chunks hold at least this many logits (4 MB): small vocabularies (the tiny model's few
# hundred tokens) then take one chunk per row chunk, instead of many too thin for a fast matmul.
MIN_CHUNK_ELEMENTS = 2**20


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
    chunk_size: logits held at once by the eager path, counted in rows of the full vocabulary
                (memory chunk_size x V x 4 bytes); chunks are up to MAX_CHUNK_ROWS rows by the
                columns that fit. The Triton path has its own budget (logprobs_triton.BUFFER_BYTES).
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
    V = weight_VH.shape[0]
    targets_N = targets_BT.reshape(-1).long().clamp(0, V - 1)
    grad_on = torch.is_grad_enabled()
    grads = (grad_on and hidden_BTH.requires_grad, grad_on and weight_VH.requires_grad)
    # Triton on CUDA for 16-bit inputs of one dtype (the training case); fp32 or mixed inputs stay
    # on cuBLAS through the eager path (an fp32 Triton dot is exact but runs on CUDA cores).
    fused = (hidden_BTH.is_cuda and hidden_BTH.dtype in (torch.bfloat16, torch.float16)
             and weight_VH.dtype == hidden_BTH.dtype and _triton_available())
    if backend == "triton" or (backend == "auto" and fused):
        from grpo_speech.logprobs_triton import triton_token_logprobs

        logprobs_N = triton_token_logprobs(hidden_BTH.reshape(-1, H), weight_VH, targets_N, 1.0 / scale, *grads)
    else:
        logprobs_N = ChunkedLogprobs.apply(EagerChunks, hidden_BTH.reshape(-1, H), weight_VH, targets_N,
                                            1.0 / scale, max(chunk_size * V, MIN_CHUNK_ELEMENTS), *grads)
    return logprobs_N.view(targets_BT.shape)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401  (ships with CUDA builds of torch)
    except ImportError:
        return False
    return True


def chunk_shape(N: int, V: int, elements: int, max_rows: int, col_tile: int | None = None) -> tuple[int, int]:
    """Rows and vocabulary columns of the chunks that cover the N x V logits, about `elements` each.

    Rows come first: min(N, max_rows). The columns take the rest of the budget, at most V: eager
    chunks take ceil(elements / rows), the last chunk of a row holding what is left; a kernel's
    chunks (col_tile: its tile width) take at most elements / rows, evened out into equal chunks of
    whole tiles, so that no launch is a thin sliver at the end of the vocabulary.
    """
    rows = max(1, min(N, max_rows))
    if col_tile is None:
        return rows, max(1, min(V, ceil_div(elements, rows)))
    cols = max(1, elements // rows)
    if cols < V:
        n_chunks = ceil_div(V, cols)
        cols = ceil_div(ceil_div(V, n_chunks), col_tile) * col_tile
    return rows, min(V, cols)


def mm_fp32_acc(a, b, out_dtype, out=None):
    """a @ b with fp32 accumulation and one rounding to out_dtype (cuBLAS does this natively)."""
    kw = {} if out is None else {"out": out}
    if a.device.type == "cuda" or a.dtype == out_dtype == torch.float32:
        return torch.mm(a, b, **kw) if a.dtype == out_dtype else torch.mm(a, b, out_dtype=out_dtype, **kw)
    r = torch.mm(a.float(), b.float()).to(out_dtype)  # CPU (interpreter tests): exact fp32 products
    return r if out is None else out.copy_(r)


def _addmm_f32_(acc, a, b):
    """acc += a @ b, acc in fp32, a and b in the input dtype; on CUDA without a temporary."""
    if a.device.type != "cuda" or a.dtype == torch.float32:
        acc.addmm_(a.float(), b.float())
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):  # a torch build without addmm(out_dtype=float32, out=self)
        acc += torch.mm(a, b, out_dtype=torch.float32)


class ChunkedLogprobs(torch.autograd.Function):
    """log p(targets_N) for hidden_NH (N, H) and weight_VH (V, H), chunk by chunk; two gradient paths.

    `compute` is the per-chunk compute (`EagerChunks`, or `TritonChunks` in logprobs_triton.py):
    operand(x) gives the matmul operand of x, forward_chunks / backward_chunks the chunk geometry and
    buffer of a pass, forward_rows the log-sum-exp, target logit and (frozen head) d of a row chunk,
    grad_logits the logits' gradient of one chunk. `budget`: logits per chunk (see chunk_shape).

    Only hidden needs a gradient (frozen or LoRA-only LM head): grad_hidden_n = g_n * d_n with
    d_n = inv_scale * (W[t_n] - p_n W), which needs no upstream gradient g: the forward forms d with
    the log-sum-exp, so the backward does no matmul (as many matmuls as full logits).

    The weight needs one: the forward keeps one log-sum-exp per row; the backward recomputes each
    chunk's logits, forms grad_logits = g * inv_scale * (onehot - p) with p = exp(logits - lse), then
    grad_hidden += grad_logits @ W_chunk and grad_W_chunk += grad_logits^T @ hidden (four N x H x V
    matmuls in all; full logits take three).
    """

    @staticmethod
    def forward(ctx, compute, hidden_NH, weight_VH, targets_N, inv_scale, budget, hidden_grad, weight_grad):
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        dev = hidden_NH.device
        frozen_head = hidden_grad and not weight_grad
        weight_op = compute.operand(weight_VH)  # eager: a transient fp32 copy for bf16/fp16
        lse_N = torch.empty(N, dtype=torch.float32, device=dev)
        z_tgt_N = torch.empty(N, dtype=torch.float32, device=dev)  # target logits
        d_NH = torch.empty(N, H, dtype=weight_op.dtype, device=dev) if frozen_head else None
        rows, cols, buf = compute.forward_chunks(hidden_NH, V, budget, frozen_head)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            compute.forward_rows(compute.operand(hidden_NH[i:j]), weight_op, targets_N[i:j], inv_scale, cols, buf,
                                 lse_N[i:j], z_tgt_N[i:j], None if d_NH is None else d_NH[i:j])
        ctx.compute, ctx.inv_scale, ctx.budget, ctx.hidden_dtype = compute, inv_scale, budget, hidden_NH.dtype
        ctx.hidden_grad, ctx.weight_grad, ctx.frozen_head = hidden_grad, weight_grad, frozen_head
        if frozen_head:
            ctx.save_for_backward(d_NH)
        elif hidden_grad or weight_grad:
            ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        return z_tgt_N - lse_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        grad_N = grad_N.float()
        if ctx.frozen_head:
            (d_NH,) = ctx.saved_tensors
            # g * d in fp32, rounded once; by row blocks so that no N x H fp32 temporary exists
            # (it would be twice the size of a 16-bit gradient).
            grad_hidden = torch.empty(d_NH.shape, dtype=ctx.hidden_dtype, device=d_NH.device)
            step = max(1, 2**22 // d_NH.shape[1])
            for i in range(0, d_NH.shape[0], step):
                torch.mul(d_NH[i:i + step].float(), grad_N[i:i + step, None], out=grad_hidden[i:i + step])
            return None, grad_hidden, None, None, None, None, None, None
        if not (ctx.hidden_grad or ctx.weight_grad):
            return None, None, None, None, None, None, None, None
        grad_hidden, grad_weight = _recomputed_grads(ctx, grad_N, *ctx.saved_tensors)
        return None, grad_hidden, grad_weight, None, None, None, None, None


def _recomputed_grads(ctx, grad_N, hidden_NH, weight_VH, targets_N, lse_N):
    """(grad_hidden, grad_weight) from logits recomputed chunk by chunk (None where not wanted)."""
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    dev, compute = hidden_NH.device, ctx.compute
    weight_op = compute.operand(weight_VH)
    coef_N = grad_N * ctx.inv_scale
    rows, cols, buf = compute.backward_chunks(hidden_NH, V, ctx.budget)
    grad_h32_NH = torch.zeros(N, H, dtype=torch.float32, device=dev) if ctx.hidden_grad else None
    grad_W_VH = None
    if ctx.weight_grad:  # written by the first row chunk (zeros without rows); fp32 when several add to it
        grad_W_VH = (torch.empty if N else torch.zeros)(V, H, dtype=weight_op.dtype if rows == N else torch.float32,
                                                        device=dev)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        h_RH = compute.operand(hidden_NH[i:j])
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            grad_RC = compute.grad_logits(h_RH, weight_op, targets_N[i:j], lse_N[i:j], coef_N[i:j],
                                          ctx.inv_scale, c0, c1, buf)
            if grad_h32_NH is not None:
                _addmm_f32_(grad_h32_NH[i:j], grad_RC, weight_op[c0:c1])
            if grad_W_VH is not None:
                if i == 0:  # the first row chunk writes the block, later ones add to it
                    mm_fp32_acc(grad_RC.t(), h_RH, grad_W_VH.dtype, out=grad_W_VH[c0:c1])
                else:
                    _addmm_f32_(grad_W_VH[c0:c1], grad_RC.t(), h_RH)
    grad_hidden = grad_h32_NH.to(hidden_NH.dtype) if grad_h32_NH is not None else None
    grad_weight = grad_W_VH.to(weight_VH.dtype) if grad_W_VH is not None else None
    return grad_hidden, grad_weight


class EagerChunks:
    """Per-chunk compute in fp32 PyTorch ops: chunks of rows x vocabulary columns in one fp32 buffer."""

    @staticmethod
    def operand(x):
        return x.float()  # no copy for fp32

    @staticmethod
    def forward_chunks(hidden_NH, V, budget, frozen_head):
        rows, cols = chunk_shape(hidden_NH.shape[0], V, budget, MAX_CHUNK_ROWS)
        return rows, cols, torch.empty(rows * cols, dtype=torch.float32, device=hidden_NH.device)

    @staticmethod
    def backward_chunks(hidden_NH, V, budget):
        return EagerChunks.forward_chunks(hidden_NH, V, budget, False)

    @staticmethod
    def forward_rows(h_RH, w_VH, t_R, inv_scale, cols, buf, lse_R, z_tgt_R, d_RH):
        """lse_R, z_tgt_R and (d_RH not None) d_RH of a row chunk, written in place."""
        R, (V, H), dev = h_RH.shape[0], w_VH.shape, h_RH.device
        # Online log-sum-exp over the row's chunks: running max m, sum of exp(logit - m), and
        # (frozen head) e = sum of exp(logit - m) * W row, rescaled when m grows.
        m_R = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
        sum_R = torch.zeros(R, dtype=torch.float32, device=dev)
        target_R = torch.zeros(R, dtype=torch.float32, device=dev)
        e_RH = torch.zeros(R, H, dtype=torch.float32, device=dev) if d_RH is not None else None
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            w_CH = w_VH[c0:c1]
            logits_RC = torch.mm(h_RH, w_CH.t(), out=buf[: R * (c1 - c0)].view(R, c1 - c0))
            logits_RC.mul_(inv_scale)
            in_chunk_R = (t_R >= c0) & (t_R < c1)
            picked_R = logits_RC.gather(1, (t_R - c0).clamp(0, c1 - c0 - 1)[:, None])[:, 0]
            target_R = torch.where(in_chunk_R, picked_R, target_R)
            m_new_R = torch.maximum(m_R, logits_RC.amax(dim=1))
            rescale_R = torch.exp(m_R - m_new_R)  # 0 on the first chunk (m = -inf)
            p_RC = logits_RC.sub_(m_new_R[:, None]).exp_()  # in place: one chunk buffer only
            sum_R = sum_R * rescale_R + p_RC.sum(dim=1)
            if e_RH is not None:
                e_RH.mul_(rescale_R[:, None]).addmm_(p_RC, w_CH)
            m_R = m_new_R
        lse_R.copy_(m_R + sum_R.log())
        z_tgt_R.copy_(target_R)
        if d_RH is not None:
            d_RH.copy_((w_VH.index_select(0, t_R) - e_RH / sum_R[:, None]) * inv_scale)

    @staticmethod
    def grad_logits(h_RH, w_VH, t_R, lse_R, coef_R, inv_scale, c0, c1, buf):
        """coef * (onehot - p) for rows h_RH and vocabulary columns [c0, c1), built in place in buf."""
        R = h_RH.shape[0]
        logits_RC = torch.mm(h_RH, w_VH[c0:c1].t(), out=buf[: R * (c1 - c0)].view(R, c1 - c0))
        coef_R1 = coef_R[:, None]
        grad_RC = logits_RC.mul_(inv_scale).sub_(lse_R[:, None]).exp_().mul_(-coef_R1)
        in_chunk_R1 = ((t_R >= c0) & (t_R < c1))[:, None]
        cols_R1 = (t_R - c0).clamp(0, c1 - c0 - 1)[:, None]
        return grad_RC.scatter_add_(1, cols_R1, torch.where(in_chunk_R1, coef_R1, 0.0))
