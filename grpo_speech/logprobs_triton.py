"""Token log-probs on GPU: Triton logits tiles with a fused softmax epilogue, never N x V logits.

What it buys, as measured on one H200 (README, "Log-probs on GPU": bf16, V = 49160, forward +
backward): memory, at about Liger's speed. Extra memory with a frozen head is 62-116 MB where full
logits take 1,800-7,201 MB (1.6-4.1 %) and Liger's fused linear cross-entropy, which returns a
loss rather than per-token log-probs, 25-98 MB; with a trainable head 273 MB (15 %; Liger 217 MB).
Time is 0.54-1.37x Liger's (faster at N x H = 3200 x 2048, slower at 3200 x 4096 and
12800 x 2048), 10-17x faster than the eager chunked path, and 1.24-1.35x compiled full logits,
which take 3-31x its memory.

`token_logprobs` (logprobs.py) runs these kernels for 16-bit CUDA tensors, through the autograd
function it shares with the eager path (`ChunkedLogprobs`): `TritonChunks` below is the per-chunk
compute it plugs in. Measured by `python -m grpo_speech bench logprobs --device cuda`; tested on
CPU by `pytest tests/test_logprobs_triton.py`, which runs the kernels under Triton's interpreter.

Design (N rows, H hidden, V vocab, inv_scale = 1 / (logit_scale * temperature),
z = inv_scale * h W^T):
- Two kernels over one tile helper (`_logits_tile`: a BLOCK_R x BLOCK_C tile of z with bf16
  tl.dot and fp32 accumulation over H, never stored). `_forward_kernel` reduces each tile to a max
  and a sum of exp(z - max) per row, plus z at the target; log-sum-exp is online over vocabulary
  tiles, the per-tile (max, sum) pairs merged per row afterwards (a few floats per row).
  `_backward_kernel` writes the logits' gradient coef_n * (onehot - exp(z - lse_n)) of its tile.
- The two products with a full-H output (grad_logits @ W and grad_logits^T @ h) are cuBLAS
  matmuls over a bounded chunk of gradient logits, written by the kernel. Fusing them would need a
  BLOCK_R x H fp32 accumulator per program (1 MB at H = 2048): far past registers and shared
  memory, and atomics into HBM instead cost ~V / BLOCK_C passes over an N x H fp32 buffer.
- Frozen head (LoRA; the common case): the hidden gradient is g_n * d_n with
  d_n = inv_scale * (W[t_n] - p_n W) = (inv_scale * (onehot - p_n)) W, which needs no upstream
  gradient. The forward computes it per row chunk covering the whole vocabulary: the forward kernel
  also writes exp(z - tile max) into the chunk buffer, a light pass rescales it to
  inv_scale * (onehot - p) once the row's lse is known, and one matmul gives d. So z is computed
  once: 4 N H V flops in all, as many as full logits with a frozen head, and the backward is an
  elementwise product. The onehot is folded in before the bf16 rounding, so a confident token
  (p_t near 1) keeps a gradient accurate relative to (1 - p_t), not to |W|.
- Trainable head: the forward only reduces (2NHV); the backward recomputes z per vocabulary chunk
  spanning all rows, writes the logits' gradient (now with g) into the chunk buffer, and takes
  grad_W for that chunk in one matmul (complete, written once in the weight dtype) and adds
  grad_logits @ W_chunk into an fp32 N x H hidden gradient. 8NHV flops in all (naive: 6NHV).
Extra memory: one chunk buffer (BUFFER_BYTES, 50 MiB by default: 512 rows x 49160 for the frozen
forward) and O(N) floats; frozen head, d (N x H in the input dtype) from forward to backward;
trainable head, an fp32 N x H accumulator in the backward. Speed (the benchmark counts 6NHV per
step for every row, the cost of full logits with a trainable head): the frozen path does 4NHV in
matmuls plus one elementwise pass over the bf16 buffer; the tiles are sized for Hopper
(GPU_CONFIG). fp32 inputs use IEEE fp32 dots (no TF32), for tests and exactness.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_speech.distributed import ceil_div
from grpo_speech.logprobs import MAX_CHUNK_ROWS, ChunkedLogprobs, chunk_shape, mm_fp32_acc

# Chunk buffer for logits' gradients, in bytes. Larger chunks mean fewer passes over W (each row
# chunk of the frozen forward reads W twice: 200 MB at V x H = 49160 x 2048 in bf16, so rows per
# chunk set the matmuls' flops per byte of W: 512 rows is 3x an H200's 165 flop/B balance) and
# larger matmuls; smaller ones less memory. 50 MiB: 512-row chunks at V = 49160 in bf16, 2.8 % of
# full logits' extra peak at N x H = 3200 x 2048 (1,878 MB eager).
BUFFER_BYTES = 50 * 2**20

# Tile shapes. On Hopper a 128 x 256 fp32 accumulator over 8 warps (two warpgroups of wgmma) with
# K steps of 64 and 3 pipeline stages is the shape Triton's own matmul reaches cuBLAS-class speed
# with; shared memory 3 x (128 x 64 + 64 x 256) x 2 B = 144 KB.
GPU_CONFIG = dict(BLOCK_R=128, BLOCK_C=256, BLOCK_K=64, num_warps=8, num_stages=3)
# fp32 operands are twice the bytes: 3 stages of 128 x 64 + 64 x 256 would need 288 KB of shared
# memory (Hopper has 228 KB); 2 stages of K = 32 need 96 KB. The fp32 path is for exactness, not speed.
GPU_CONFIG_FP32 = dict(GPU_CONFIG, BLOCK_K=32, num_stages=2)
# CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1): small tiles, so that tests
# at odd sizes cross many tile edges quickly.
INTERPRET_CONFIG = dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16, num_warps=1, num_stages=1)
# The rescaling pass is elementwise; its tile columns must match the forward kernel's BLOCK_C.
NORM_BLOCK_R = 32
# Rows x tiles per step of the lse merge (193 tiles per row at V = 49160, BLOCK_C = 256).
MERGE_BLOCK_R, MERGE_BLOCK_T = 16, 64


def _config(x: torch.Tensor) -> dict:
    """Tiles, launch options and dot precision of the tile kernels for operands like x. fp32 inputs get
    IEEE dots (TF32 would cost 3 digits); for bf16 / fp16 operands the precision is ignored."""
    fp32 = x.dtype == torch.float32
    cfg = INTERPRET_CONFIG if x.device.type != "cuda" else GPU_CONFIG_FP32 if fp32 else GPU_CONFIG
    return dict(cfg, PRECISION="ieee" if fp32 else "tf32")


@triton.jit
def _logits_tile(h_ptr, w_ptr, R, C, stride_h, stride_w, inv_scale,
                 H: tl.constexpr,  # a compile-time trip count: unrolled K loop, no K masks when BLOCK_K divides H
                 PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of z = inv_scale * h W^T over a chunk of R rows (h) x C vocabulary
    columns (W from w_ptr), in fp32 with -inf in padding columns: (z, rows, cols, tile column)."""
    pid = tl.program_id(0)
    n_r = tl.cdiv(R, BLOCK_R)
    # Row tiles vary fastest: programs running together share one W tile (read from HBM once)
    # while the chunk's rows (R x H, a few MB) stay in L2.
    pid_r = pid % n_r
    pid_c = pid // n_r
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < C
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]  # W^T tile
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if H % BLOCK_K == 0:  # Granite's 2048 / 4096: no K masks to evaluate
            a = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < H - k0
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return tl.where(col_ok[None, :], acc * inv_scale, float("-inf")), rows, cols, pid_c


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, tgt_ptr, tile_max_ptr, tile_sum_ptr, z_tgt_ptr, exp_ptr,
    R, V, stride_h, stride_w, stride_tile, stride_exp, inv_scale,
    H: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of a row chunk spanning the vocabulary: per row, the tile's max m and sum of
    exp(z - m) into tile_max / tile_sum[row, tile], z at the target into z_tgt[row] (from the tile
    holding it), and exp(z - m) into exp[row, col]. exp_ptr and stride_exp are None in a pass that
    needs only the log-sum-exp: Triton takes None arguments as constants and compiles the store out."""
    z, rows, cols, pid_c = _logits_tile(h_ptr, w_ptr, R, V, stride_h, stride_w, inv_scale,
                                        H, PRECISION, BLOCK_R, BLOCK_C, BLOCK_K)
    row_ok = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.max(z, axis=1)  # finite: every tile has at least one real column
    e = tl.exp(z - m[:, None])
    tl.store(tile_max_ptr + rows * stride_tile + pid_c, m, mask=row_ok)
    tl.store(tile_sum_ptr + rows * stride_tile + pid_c, tl.sum(e, axis=1), mask=row_ok)
    in_tile = (tgt >= pid_c * BLOCK_C) & (tgt < pid_c * BLOCK_C + BLOCK_C) & (tgt < V)
    z_tgt = tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    tl.store(z_tgt_ptr + rows, z_tgt, mask=row_ok & in_tile)
    if exp_ptr is not None:
        exp_ptrs = exp_ptr + rows[:, None].to(tl.int64) * stride_exp + cols[None, :]
        tl.store(exp_ptrs, e.to(exp_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])


@triton.jit
def _backward_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, coef_ptr, grad_ptr,
    R, C, col0, stride_h, stride_w, stride_grad, inv_scale,
    H: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of a chunk of R rows x C vocabulary columns from col0 (w_ptr: W's row col0):
    grad[row, col] = coef[row] * (onehot - exp(z - lse[row]))."""
    z, rows, cols, _ = _logits_tile(h_ptr, w_ptr, R, C, stride_h, stride_w, inv_scale,
                                    H, PRECISION, BLOCK_R, BLOCK_C, BLOCK_K)
    row_ok = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # 0 in padding columns (z = -inf)
    g = coef[:, None] * (tl.where((col0 + cols)[None, :] == tgt[:, None], 1.0, 0.0) - p)
    grad_ptrs = grad_ptr + rows[:, None].to(tl.int64) * stride_grad + cols[None, :]
    tl.store(grad_ptrs, g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < C)[None, :])


@triton.jit
def _softmax_grad_kernel(
    buf_ptr, tile_max_ptr, lse_ptr, tgt_ptr, R, V, stride_buf, stride_tile, coef,
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
    m = tl.load(tile_max_ptr + rows * stride_tile + pid_c, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = e * tl.exp(m - lse)[:, None]
    g = coef * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    tl.store(ptrs, g.to(buf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_lse_kernel(tile_max_ptr, tile_sum_ptr, lse_ptr, R, stride_tile, N_TILES: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """lse[row] from the per-tile (max, sum of exp(z - max)) pairs, merged online; one launch
    instead of a handful of small torch ops per chunk (launches cost ~us, chunks ~0.3 ms)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, N_TILES, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = row_ok[:, None] & (ts < N_TILES)[None, :]
        offs = rows[:, None] * stride_tile + ts[None, :]
        tm = tl.load(tile_max_ptr + offs, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(tm, axis=1))
        m_safe = tl.where(row_ok, m_new, 0.0)  # padding rows are all -inf: avoid inf - inf
        tile_sum = tl.load(tile_sum_ptr + offs, mask=mask, other=0.0)
        sum_exp = sum_exp * tl.exp(m - m_safe) + tl.sum(tile_sum * tl.exp(tm - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(tl.where(row_ok, sum_exp, 1.0)), mask=row_ok)


def _padded(cols: int) -> int:
    # Row stride of chunk buffers, a multiple of 64 elements: Triton vectorises stores only when it
    # can prove 16-element divisibility (V = 49160 is not), and cuBLAS accepts any leading dimension.
    return ceil_div(cols, 64) * 64


def _chunk_view(buf, rows: int, cols: int):
    """The first rows x cols of buf as a matrix with padded row stride."""
    return buf[: rows * _padded(cols)].view(rows, _padded(cols))[:, :cols]


class TritonChunks:
    """Per-chunk compute of `ChunkedLogprobs` by the kernels above; operands in the input dtype."""

    @staticmethod
    def operand(x):
        return x

    @staticmethod
    def forward_chunks(hidden_NH, V, budget, frozen_head):
        """Row chunks spanning the vocabulary. Frozen head: as many rows as the buffer holds (the
        kernel also writes exp(z - tile max) there), in whole row tiles; else no buffer."""
        N = hidden_NH.shape[0]
        if not frozen_head:
            return chunk_shape(N, V, MAX_CHUNK_ROWS * V, MAX_CHUNK_ROWS) + (None,)
        max_rows, row_tile = budget // _padded(V), _config(hidden_NH)["BLOCK_R"]
        if max_rows >= row_tile:
            max_rows -= max_rows % row_tile
        rows, _ = chunk_shape(N, V, budget, max_rows)
        return rows, V, torch.empty(rows * _padded(V), dtype=hidden_NH.dtype, device=hidden_NH.device)

    @staticmethod
    def backward_chunks(hidden_NH, V, budget):
        """Vocabulary chunks spanning all rows (as many as leave room for one tile column), so that
        grad_W of a chunk is complete in one matmul."""
        block_c = _config(hidden_NH)["BLOCK_C"]
        rows, cols = chunk_shape(hidden_NH.shape[0], V, budget, budget // block_c, col_tile=block_c)
        return rows, cols, torch.empty(rows * _padded(cols), dtype=hidden_NH.dtype, device=hidden_NH.device)

    @staticmethod
    def forward_rows(h_RH, w_VH, t_R, inv_scale, cols, buf, lse_R, z_tgt_R, d_RH):
        """lse_R, z_tgt_R and (d_RH not None) d_RH of a row chunk, written in place."""
        R, H = h_RH.shape
        args = _config(h_RH)
        exp_RV = None if buf is None else _chunk_view(buf, R, cols)
        n_tiles = triton.cdiv(cols, args["BLOCK_C"])
        tile_max = torch.empty(R, n_tiles, dtype=torch.float32, device=h_RH.device)
        tile_sum = torch.empty(R, n_tiles, dtype=torch.float32, device=h_RH.device)
        _forward_kernel[(triton.cdiv(R, args["BLOCK_R"]) * n_tiles,)](
            h_RH, w_VH, t_R, tile_max, tile_sum, z_tgt_R, exp_RV,
            R, cols, h_RH.stride(0), w_VH.stride(0), tile_max.stride(0), None if exp_RV is None else exp_RV.stride(0),
            inv_scale, H=H, **args,
        )
        _merge_lse_kernel[(triton.cdiv(R, MERGE_BLOCK_R),)](
            tile_max, tile_sum, lse_R, R, tile_max.stride(0),
            N_TILES=n_tiles, BLOCK_R=MERGE_BLOCK_R, BLOCK_T=MERGE_BLOCK_T)
        if d_RH is not None:  # d = (inv_scale * (onehot - p)) @ W (module docstring)
            _softmax_grad_kernel[(triton.cdiv(R, NORM_BLOCK_R), n_tiles)](
                exp_RV, tile_max, lse_R, t_R, R, cols, exp_RV.stride(0), tile_max.stride(0), inv_scale,
                BLOCK_R=NORM_BLOCK_R, BLOCK_C=args["BLOCK_C"])
            mm_fp32_acc(exp_RV, w_VH, d_RH.dtype, out=d_RH)

    @staticmethod
    def grad_logits(h_RH, w_VH, t_R, lse_R, coef_R, inv_scale, c0, c1, buf):
        """coef * (onehot - p) for rows h_RH and vocabulary columns [c0, c1), written into buf."""
        (R, H), C = h_RH.shape, c1 - c0
        args = _config(h_RH)
        grad_RC = _chunk_view(buf, R, C)
        grid = (triton.cdiv(R, args["BLOCK_R"]) * triton.cdiv(C, args["BLOCK_C"]),)
        _backward_kernel[grid](h_RH, w_VH[c0:c1], t_R, lse_R, coef_R, grad_RC, R, C, c0,
                               h_RH.stride(0), w_VH.stride(0), grad_RC.stride(0), inv_scale, H=H, **args)
        return grad_RC


def triton_token_logprobs(hidden_NH, weight_VH, targets_N, inv_scale, hidden_grad, weight_grad):
    """log p(targets_N) for hidden_NH (N, H) and weight_VH (V, H); targets already clamped."""
    if weight_VH.dtype != hidden_NH.dtype:
        weight_VH = weight_VH.to(hidden_NH.dtype)
    return ChunkedLogprobs.apply(TritonChunks, hidden_NH.contiguous(), weight_VH.contiguous(),
                                  targets_N.contiguous(), float(inv_scale),
                                  BUFFER_BYTES // hidden_NH.element_size(), bool(hidden_grad), bool(weight_grad))
