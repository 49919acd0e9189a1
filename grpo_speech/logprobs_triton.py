"""Token log-probs on GPU: Triton logits tiles with a fused softmax epilogue, never N x V logits.

`token_logprobs` (logprobs.py) calls `triton_token_logprobs` for CUDA tensors; the chunked PyTorch
function there stays the reference and the CPU path. Measured by
`python -m grpo_speech bench logprobs --device cuda`; tested on CPU by
`pytest tests/test_logprobs_triton.py`, which runs these kernels under Triton's interpreter.

Design (N rows, H hidden, V vocab, s = 1 / (logit_scale * temperature), z = s * h W^T):
- One Triton kernel computes a (BLOCK_R x BLOCK_C) tile of z with bf16 tl.dot and fp32
  accumulation over H, and never stores z. Its epilogue either reduces the tile to a max and a sum
  of exp(z - max) per row (plus z at the target), or writes the logits' gradient
  coef_n * (onehot - exp(z - lse_n)) for the tile in the input dtype. Log-sum-exp is online over
  vocabulary tiles: per-tile (max, sum) pairs are merged per row afterwards (a few floats per row).
- The two products with a full-H output (grad_logits @ W and grad_logits^T @ h) are cuBLAS
  matmuls over a bounded block of gradient logits, written by the kernel. Fusing them would need a
  BLOCK_R x H fp32 accumulator per program (1 MB at H = 2048): far past registers and shared
  memory, and atomics into HBM instead cost ~V / BLOCK_C passes over an N x H fp32 buffer.
- Frozen head (LoRA; the common case): the hidden gradient is g_n * d_n with
  d_n = s * (W[t_n] - p_n W) = (s * (onehot - p_n)) W, which needs no upstream gradient. The
  forward computes it per row chunk covering the whole vocabulary: the kernel writes
  exp(z - tile max) into a chunk buffer while reducing, a light pass rescales it to
  s * (onehot - p) once the row's lse is known, and one matmul gives d. So z is computed once:
  4 N H V flops in all, as many as full logits with a frozen head, and the backward is an
  elementwise product. The onehot is folded in before the bf16 rounding, so a confident token
  (p_t near 1) keeps a gradient accurate relative to (1 - p_t), not to |W|.
- Trainable head: the forward only reduces (2NHV); the backward recomputes z per vocabulary chunk
  spanning all rows, writes the logits' gradient (now with g) into the chunk buffer, and takes
  grad_W for that chunk in one matmul (complete, written once in the weight dtype) and adds
  grad_logits @ W_chunk into an fp32 N x H hidden gradient. 8NHV flops in all (naive: 6NHV).
Extra memory: one chunk buffer (BUFFER_BYTES, 50 MiB by default: 512 rows x 49160 for the frozen
forward) and O(N) floats; frozen head, d (N x H in the input dtype) from forward to backward;
trainable head, an fp32 N x H accumulator in the backward. Speed (the issue counts 6NHV per step):
the frozen path does 4NHV in matmuls plus one elementwise pass over the bf16 buffer; the tiles are
sized for Hopper (GPU_CONFIG). fp32 inputs use IEEE fp32 dots (no TF32), for tests and exactness.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Chunk buffer for logits' gradients, in bytes. Larger chunks mean fewer passes over W (each row
# chunk of the frozen forward reads W twice: 200 MB at V x H = 49160 x 2048 in bf16, so rows per
# chunk set the matmuls' flops per byte of W: 512 rows is 3x an H200's 165 flop/B balance) and
# larger matmuls; smaller ones less memory. 50 MiB: 512-row chunks at V = 49160 in bf16, 2.8 % of
# full logits' extra peak at N x H = 3200 x 2048 (1,878 MB eager).
BUFFER_BYTES = 50 * 2**20
# Rows reduced per launch when no buffer is written (inference, trainable-head forward): bounds
# the per-tile (max, sum) partials to ROWS x V / BLOCK_C x 8 bytes (3 MB at V = 49160).
STATS_ROWS = 2048

# Tile shapes. On Hopper a 128 x 256 fp32 accumulator over 8 warps (two warpgroups of wgmma) with
# K steps of 64 and 3 pipeline stages is the shape Triton's own matmul reaches cuBLAS-class speed
# with; shared memory 3 x (128 x 64 + 64 x 256) x 2 B = 144 KB. The interpreter gets small tiles
# so that CPU tests at odd sizes cross many tile edges quickly.
# UPCAST: Triton 3.6's interpreter multiplies bf16 operands of tl.dot wrongly (garbage), so there
# the tiles are upcast first; products of bf16 values are exact in fp32, so the arithmetic is the
# GPU's bf16 dot with fp32 accumulation up to summation order.
GPU_CONFIG = dict(BLOCK_R=128, BLOCK_C=256, BLOCK_K=64, num_warps=8, num_stages=3, UPCAST=False)
INTERPRET_CONFIG = dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16, num_warps=1, num_stages=1, UPCAST=True)
# The rescaling pass is elementwise; its tile columns must match the reduction's BLOCK_C.
NORM_BLOCK_R = 32
# Rows x tiles per step of the lse merge (193 tiles per row at V = 49160, BLOCK_C = 256).
MERGE_BLOCK_R, MERGE_BLOCK_T = 16, 64


# Read when the kernels below are decorated, which is when Triton decides to interpret them.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# fp32 operands are twice the bytes: 3 stages of 128 x 64 + 64 x 256 would need 288 KB of shared
# memory (Hopper has 228 KB); 2 stages of K = 32 need 96 KB. The fp32 path is for exactness, not speed.
GPU_CONFIG_FP32 = dict(GPU_CONFIG, BLOCK_K=32, num_stages=2)


def _config(dtype: torch.dtype) -> dict:
    if INTERPRETED:
        return INTERPRET_CONFIG
    return GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG


@triton.jit
def _logits_tile_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, coef_ptr, buf_ptr, tmax_ptr, tsum_ptr, ztgt_ptr,
    R, C, col0,
    stride_h, stride_w, stride_buf, stride_t,
    inv_scale,
    H: tl.constexpr,  # a compile-time trip count: unrolled K loop, no K masks when BLOCK_K divides H
    GRAD: tl.constexpr, WRITE_BUF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of z = s * h[rows] W[col0 + cols]^T over a block of R rows x C vocabulary columns.

    GRAD = False: per row, the tile's max m and sum of exp(z - m) into (tmax, tsum)[row, tile],
    z at the target into ztgt[row] (only the tile holding it writes), and with WRITE_BUF
    exp(z - m) into buf[row, col]. GRAD = True: buf[row, col] = coef[row] * (onehot - exp(z - lse[row])).
    """
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    # Row tiles vary fastest: programs running together share one W tile (read from HBM once)
    # while the block's rows (R x H, a few MB) stay in L2.
    pid_r = pid % n_r
    pid_c = pid // n_r
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < C
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = w_ptr + (col0 + cols)[None, :].to(tl.int64) * stride_w + ks[:, None]  # W^T tile
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if H % BLOCK_K == 0:  # Granite's 2048 / 4096: no K masks to evaluate
            a = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < H - k0
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    z = tl.where(col_ok[None, :], acc * inv_scale, float("-inf"))
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    onehot = (col0 + cols)[None, :] == tgt[:, None]
    buf_ptrs = buf_ptr + rows[:, None].to(tl.int64) * stride_buf + cols[None, :]
    buf_mask = row_ok[:, None] & col_ok[None, :]
    if GRAD:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])  # 0 in padding columns (z = -inf)
        g = coef[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
        tl.store(buf_ptrs, g.to(buf_ptr.dtype.element_ty), mask=buf_mask)
    else:
        m = tl.max(z, axis=1)  # finite: every tile has at least one real column
        e = tl.exp(z - m[:, None])
        tl.store(tmax_ptr + rows * stride_t + pid_c, m, mask=row_ok)
        tl.store(tsum_ptr + rows * stride_t + pid_c, tl.sum(e, axis=1), mask=row_ok)
        in_tile = (tgt >= col0 + pid_c * BLOCK_C) & (tgt < col0 + pid_c * BLOCK_C + BLOCK_C) & (tgt < col0 + C)
        z_tgt = tl.sum(tl.where(onehot, z, 0.0), axis=1)
        tl.store(ztgt_ptr + rows, z_tgt, mask=row_ok & in_tile)
        if WRITE_BUF:
            tl.store(buf_ptrs, e.to(buf_ptr.dtype.element_ty), mask=buf_mask)


@triton.jit
def _softmax_grad_kernel(
    buf_ptr, tmax_ptr, lse_ptr, tgt_ptr, R, V, stride_buf, stride_t, coef,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """In place: buf = coef * (onehot - buf * exp(tile max - lse)), turning exp(z - tile max) into
    the logits' gradient direction once each row's lse is known (frozen-head forward)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < V)[None, :]
    ptrs = buf_ptr + rows[:, None].to(tl.int64) * stride_buf + cols[None, :]
    e = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(tmax_ptr + rows * stride_t + pid_c, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = e * tl.exp(m - lse)[:, None]
    g = coef * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    tl.store(ptrs, g.to(buf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_lse_kernel(tmax_ptr, tsum_ptr, lse_ptr, R, stride_t, N_TILES: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """lse[row] from the per-tile (max, sum of exp(z - max)) pairs, merged online; one launch
    instead of a handful of small torch ops per chunk (launches cost ~us, chunks ~0.3 ms)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, N_TILES, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (ts < N_TILES)[None, :]
        offs = rows[:, None] * stride_t + ts[None, :]
        tm = tl.load(tmax_ptr + offs, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(tm, axis=1))
        m_safe = tl.where(row_ok, m_new, 0.0)  # padding rows are all -inf: avoid inf - inf
        ts_sum = tl.load(tsum_ptr + offs, mask=mask, other=0.0)
        s = s * tl.exp(m - m_safe) + tl.sum(ts_sum * tl.exp(tm - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(tl.where(row_ok, s, 1.0)), mask=row_ok)


def _precision(dtype: torch.dtype, cfg: dict) -> str:
    # fp32 inputs get IEEE dots (TF32 would cost 3 digits); for bf16 / fp16 operands it is ignored.
    return "ieee" if dtype == torch.float32 or cfg["UPCAST"] else "tf32"


def _reduce_rows(hidden_RH, weight_VH, targets_R, inv_scale, buf_RV, lse_R, z_tgt_R, cfg):
    """lse_R and z_tgt_R (target logits) for R rows over the whole vocabulary, written in place;
    with buf_RV, also exp(z - tile max) into it. Returns the per-tile maxima (R, V / BLOCK_C)."""
    R, H = hidden_RH.shape
    V = weight_VH.shape[0]
    n_c = triton.cdiv(V, cfg["BLOCK_C"])
    dev = hidden_RH.device
    tmax = torch.empty(R, n_c, dtype=torch.float32, device=dev)
    tsum = torch.empty(R, n_c, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]) * n_c,)
    _logits_tile_kernel[grid](
        hidden_RH, weight_VH, targets_R, lse_R, lse_R, hidden_RH if buf_RV is None else buf_RV,
        tmax, tsum, z_tgt_R,
        R, V, 0,
        hidden_RH.stride(0), weight_VH.stride(0), 0 if buf_RV is None else buf_RV.stride(0), tmax.stride(0),
        inv_scale,
        H=H, GRAD=False, WRITE_BUF=buf_RV is not None, PRECISION=_precision(hidden_RH.dtype, cfg),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], UPCAST=cfg["UPCAST"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _merge_lse_kernel[(triton.cdiv(R, MERGE_BLOCK_R),)](tmax, tsum, lse_R, R, tmax.stride(0), N_TILES=n_c,
                                                        BLOCK_R=MERGE_BLOCK_R, BLOCK_T=MERGE_BLOCK_T)
    return tmax


def _chunk_rows(N: int, V: int, itemsize: int) -> int:
    rows = max(1, BUFFER_BYTES // (_padded(V) * itemsize))
    if rows >= 128:
        rows -= rows % 128  # whole 128-row tiles
    return min(rows, N)


def _mm(a, b, out_dtype, out=None):
    """a @ b with fp32 accumulation and one rounding to out_dtype (cuBLAS does this natively)."""
    kw = {} if out is None else {"out": out}
    if a.device.type == "cuda" or a.dtype == out_dtype == torch.float32:
        return torch.mm(a, b, **kw) if a.dtype == out_dtype else torch.mm(a, b, out_dtype=out_dtype, **kw)
    r = torch.mm(a.float(), b.float()).to(out_dtype)  # CPU (interpreter tests): exact fp32 products
    return r if out is None else out.copy_(r)


_ADDMM_INTO_FP32 = True  # cleared if this torch build refuses addmm(out_dtype=float32, out=self)


def _addmm_f32_(acc, a, b):
    """acc += a @ b, acc in fp32, a and b in the input dtype; on CUDA without a temporary."""
    global _ADDMM_INTO_FP32
    if a.device.type == "cuda" and a.dtype != torch.float32:
        if _ADDMM_INTO_FP32:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (RuntimeError, TypeError):
                _ADDMM_INTO_FP32 = False
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc.addmm_(a.float(), b.float())


def _padded(cols: int) -> int:
    # Row stride of chunk buffers, a multiple of 64 elements: Triton vectorises stores only when it
    # can prove 16-element divisibility (V = 49160 is not), and cuBLAS accepts any leading dimension.
    return -(-cols // 64) * 64


class TritonLogprobs(torch.autograd.Function):
    """Autograd wrapper; hidden_NH, weight_VH contiguous and of one dtype, targets_N in [0, V)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, inv_scale, hidden_grad, weight_grad):
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        cfg = _config(hidden_NH.dtype)
        dev, dtype = hidden_NH.device, hidden_NH.dtype
        precompute = hidden_grad and not weight_grad
        lse_N = torch.empty(N, dtype=torch.float32, device=dev)
        z_tgt_N = torch.empty(N, dtype=torch.float32, device=dev)
        d_NH = None
        if precompute:
            # d = (s * (onehot - p)) @ W per row chunk spanning the vocabulary (module docstring).
            d_NH = torch.empty(N, H, dtype=dtype, device=dev)
            rows = _chunk_rows(N, V, hidden_NH.element_size())
            buf = torch.empty(rows * _padded(V), dtype=dtype, device=dev)
            for i in range(0, N, rows):
                j = min(i + rows, N)
                buf_RV = buf[: (j - i) * _padded(V)].view(j - i, _padded(V))[:, :V]
                lse_R = lse_N[i:j]
                tmax = _reduce_rows(hidden_NH[i:j], weight_VH, targets_N[i:j], inv_scale, buf_RV, lse_R,
                                    z_tgt_N[i:j], cfg)
                grid = (triton.cdiv(j - i, NORM_BLOCK_R), tmax.shape[1])
                _softmax_grad_kernel[grid](buf_RV, tmax, lse_R, targets_N[i:j], j - i, V, buf_RV.stride(0),
                                           tmax.stride(0), inv_scale, BLOCK_R=NORM_BLOCK_R, BLOCK_C=cfg["BLOCK_C"])
                _mm(buf_RV, weight_VH, dtype, out=d_NH[i:j])
            del buf
        else:
            for i in range(0, N, STATS_ROWS):
                j = min(i + STATS_ROWS, N)
                _reduce_rows(hidden_NH[i:j], weight_VH, targets_N[i:j], inv_scale, None, lse_N[i:j], z_tgt_N[i:j], cfg)
        ctx.inv_scale, ctx.hidden_grad, ctx.weight_grad, ctx.precompute = inv_scale, hidden_grad, weight_grad, precompute
        if precompute:
            ctx.save_for_backward(d_NH)
        elif hidden_grad or weight_grad:
            ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        return z_tgt_N - lse_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        grad_N = grad_N.float()
        if ctx.precompute:
            (d_NH,) = ctx.saved_tensors
            # g * d in fp32, rounded once; by row blocks so that no N x H fp32 temporary exists
            # (it would be twice the size of the gradient itself).
            grad_hidden = torch.empty_like(d_NH)
            step = max(1, 2**22 // d_NH.shape[1])
            for i in range(0, d_NH.shape[0], step):
                torch.mul(d_NH[i:i + step].float(), grad_N[i:i + step, None], out=grad_hidden[i:i + step])
            return grad_hidden, None, None, None, None, None
        if not (ctx.hidden_grad or ctx.weight_grad):
            return None, None, None, None, None, None
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        cfg = _config(hidden_NH.dtype)
        dev, dtype = hidden_NH.device, hidden_NH.dtype
        coef_N = (grad_N * ctx.inv_scale).contiguous()
        # Vocabulary chunks spanning all rows (up to row_block): grad_W of a chunk is complete in
        # one matmul. Only when rows exceed row_block is grad_W accumulated, then in fp32.
        item, block_c = hidden_NH.element_size(), cfg["BLOCK_C"]
        row_block = min(N, max(1, BUFFER_BYTES // (item * block_c)))
        cols = max(1, BUFFER_BYTES // (item * row_block))
        if cols < V:  # equal chunks of whole tiles, not a ragged sliver at the end
            n_chunks = -(-V // cols)
            cols = -(-V // n_chunks)
            cols = min(V, -(-cols // block_c) * block_c)
        buf = torch.empty(row_block * _padded(cols), dtype=dtype, device=dev)
        grad_h32_NH = torch.zeros(N, H, dtype=torch.float32, device=dev) if ctx.hidden_grad else None
        grad_W_VH = None
        if ctx.weight_grad:
            grad_W_VH = torch.empty(V, H, dtype=dtype if row_block == N else torch.float32, device=dev)
        for i in range(0, N, row_block):
            j = min(i + row_block, N)
            for c0 in range(0, V, cols):
                c1 = min(c0 + cols, V)
                buf_RC = buf[: (j - i) * _padded(c1 - c0)].view(j - i, _padded(c1 - c0))[:, : c1 - c0]
                grid = (triton.cdiv(j - i, cfg["BLOCK_R"]) * triton.cdiv(c1 - c0, cfg["BLOCK_C"]),)
                _logits_tile_kernel[grid](
                    hidden_NH[i:j], weight_VH, targets_N[i:j], lse_N[i:j], coef_N[i:j], buf_RC,
                    lse_N, lse_N, lse_N,
                    j - i, c1 - c0, c0,
                    hidden_NH.stride(0), weight_VH.stride(0), buf_RC.stride(0), 0,
                    ctx.inv_scale,
                    H=H, GRAD=True, WRITE_BUF=True, PRECISION=_precision(dtype, cfg),
                    BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"], UPCAST=cfg["UPCAST"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                )
                if grad_h32_NH is not None:
                    _addmm_f32_(grad_h32_NH[i:j], buf_RC, weight_VH[c0:c1])
                if grad_W_VH is not None:
                    if i == 0:  # the first row block writes the chunk, later ones add to it
                        _mm(buf_RC.t(), hidden_NH[i:j], grad_W_VH.dtype, out=grad_W_VH[c0:c1])
                    else:
                        _addmm_f32_(grad_W_VH[c0:c1], buf_RC.t(), hidden_NH[i:j])
        grad_hidden = grad_h32_NH.to(dtype) if grad_h32_NH is not None else None
        grad_weight = grad_W_VH.to(dtype) if grad_W_VH is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def triton_token_logprobs(hidden_NH, weight_VH, targets_N, inv_scale, hidden_grad, weight_grad):
    """log p(targets_N) for hidden_NH (N, H) and weight_VH (V, H); targets already clamped."""
    if weight_VH.dtype != hidden_NH.dtype:
        weight_VH = weight_VH.to(hidden_NH.dtype)
    return TritonLogprobs.apply(hidden_NH.contiguous(), weight_VH.contiguous(), targets_N.contiguous(),
                                float(inv_scale), bool(hidden_grad), bool(weight_grad))
