"""Benchmark: token log-probs forward+backward, full logits against the fused paths, side by side.

    python -m grpo_speech bench logprobs --device cuda           # H200 table: bf16, frozen head + one trainable
    python -m grpo_speech bench logprobs --device cpu --quick    # dry run of every row on small shapes
    python -m grpo_speech bench logprobs --device cpu            # chunked vs naive, Granite's head trained, fp32

Rows: naive (log_softmax of full fp32 logits, gather), compiled naive (the same under
torch.compile), Liger's fused linear cross-entropy (only when liger-kernel imports; it computes a
CE loss, not per-token log-probs, and takes no logit scale), ours chunked (logprobs.py) and ours
Triton (logprobs_triton.py). On CUDA the variants run in one process and extra memory is the peak
of allocated memory above what was allocated before the step; on CPU each runs in its own
subprocess and it is peak resident memory (compile, Liger and Triton rows are CUDA-only there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CUDA_SIZES = "3200x2048x49160,3200x4096x49160,12800x2048x49160"  # frozen head (LoRA)
CUDA_TRAIN_SIZES = "3200x2048x49160"  # trainable (tied) head
CPU_SIZES = "1600x2048x49160,1600x4096x49160"  # N = 8 x 200 tokens; Granite 3.3 2B / 8B head
QUICK_SIZES = "300x256x4099"
VARIANTS = ("naive", "compiled", "liger", "chunked", "triton")
SCALE = 8.0  # Granite 2B's logits_scaling; any value costs the same


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); without it, the
    # peak also holds whatever input set-up touched.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:
        return False


def _step_fn(variant: str, chunk_size: int):
    """The forward for one variant: (hidden, weight, targets, upstream) -> (loss, logp or None)."""
    import torch

    from grpo_speech.logprobs import token_logprobs

    def naive(hidden, weight, targets, upstream):
        logp = torch.log_softmax((hidden @ weight.t()).float() / SCALE, dim=-1).gather(1, targets[:, None])[:, 0]
        return (logp * upstream).sum(), logp

    if variant == "naive":
        return naive
    if variant == "compiled":
        return torch.compile(naive, dynamic=False)
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger(hidden, weight, targets, upstream):
            out = ce(weight, hidden, targets)
            return (out[0] if isinstance(out, tuple) else out), None

        return liger
    backend = variant  # "chunked" or "triton"

    def ours(hidden, weight, targets, upstream):
        logp = token_logprobs(hidden, weight, targets, logit_scale=SCALE, chunk_size=chunk_size, backend=backend)
        return (logp * upstream).sum(), logp

    return ours


def _inputs(size, frozen, dtype_name, device_name):
    import torch

    N, H, V = size
    device = torch.device(device_name)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=gen) * (3.0 / H ** 0.5)).to(dtype).requires_grad_(not frozen)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    upstream = torch.randn(N, device=device, generator=gen)
    return hidden, weight, targets, upstream


def _fp32_reference(size, frozen, dtype_name, device_name):
    """Log-probs and hidden gradient from full fp32 logits of the same (bf16) inputs, no TF32."""
    import torch

    hidden, weight, targets, upstream = _inputs(size, frozen, dtype_name, device_name)
    h = hidden.detach().float().requires_grad_()
    logp = torch.log_softmax((h @ weight.detach().float().t()) / SCALE, dim=-1).gather(1, targets[:, None])[:, 0]
    (logp * upstream).sum().backward()
    return {"logp": logp.detach(), "grad_hidden": h.grad}


def _worker(variant, size, frozen, dtype_name, device_name, repeats, warmup, chunk_size) -> dict:
    import torch

    N, H, V = size
    cuda = torch.device(device_name).type == "cuda"
    hidden, weight, targets, upstream = _inputs(size, frozen, dtype_name, device_name)
    step = _step_fn(variant, chunk_size)

    def run(h, w, t, u):
        loss, logp = step(h, w, t, u)
        loss.backward()
        return logp

    if cuda:
        for _ in range(warmup):  # compilation, autotuning and allocator growth happen here
            hidden.grad = weight.grad = None
            run(hidden, weight, targets, upstream)
    else:
        # A tiny run first, so that one-time library set-up (BLAS, OpenMP and autograd threads,
        # some 30 MB on CPU) is not counted as the variant's working memory.
        tiny = [x[:8].detach().clone().requires_grad_(x.requires_grad) for x in (hidden, weight)]
        run(*tiny, targets[:8] % 8, upstream[:8])
    # Peak above the memory held just before each repeat (after the previous repeat's gradients
    # are dropped), worst repeat kept.
    times, extras = [], []
    reset = True
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset = _reset_peak_rss() and reset
            base = _status_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        logp = run(hidden, weight, targets, upstream)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
        extras.append((peak - base) / 2**20)
    return {
        "variant": variant, "N": N, "H": H, "V": V, "frozen": frozen,
        "time_s": statistics.median(times), "times_s": times,
        "peak_extra_mb": max(extras), "peak_reset": reset,
        "grads_mb": sum(x.grad.numel() * x.grad.element_size() for x in (hidden, weight) if x.grad is not None) / 2**20,
        "logp": None if logp is None else logp.detach(), "grad_hidden": hidden.grad,
    }


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in filter(None, text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--sizes: '{item}' is not NxHxV (e.g. 3200x2048x49160)")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def _parser(cuda_default: bool) -> argparse.ArgumentParser:
    from grpo_speech.logprobs import DEFAULT_CHUNK_SIZE

    p = argparse.ArgumentParser(prog="grpo_speech bench logprobs", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda_default else "cpu")
    p.add_argument("--sizes", help=f"comma-separated NxHxV with a frozen head (default: cuda {CUDA_SIZES}; cpu none)")
    p.add_argument("--train-sizes", help=f"NxHxV with a trainable head (default: cuda {CUDA_TRAIN_SIZES}; cpu {CPU_SIZES})")
    p.add_argument("--quick", action="store_true", help=f"small shapes ({QUICK_SIZES}, both heads), 2 repeats")
    p.add_argument("--variants", default=",".join(VARIANTS), help="rows to run, comma-separated")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=int, help="timed runs per variant, median kept (default: cuda 10, cpu 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first on cuda (compile, autotune)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="chunked path: rows of logits per chunk")
    p.add_argument("--triton-buffer-mb", type=float, help="Triton path: chunk buffer in MiB (default 50)")
    p.add_argument("--triton-config", help="Triton path: BLOCK_R,BLOCK_C,BLOCK_K,num_warps,num_stages "
                   "(default 128,256,64,8,3)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    return p


def _triton_module(args):
    """logprobs_triton with the --triton-* settings applied, or None when triton does not import."""
    try:
        from grpo_speech import logprobs_triton
    except ImportError:  # no triton in this torch build: the Triton row is skipped
        logprobs_triton = None
    if logprobs_triton is None and (args.triton_buffer_mb is not None or args.triton_config):
        raise SystemExit("--triton-* options need triton")
    if args.triton_buffer_mb is not None:
        logprobs_triton.BUFFER_BYTES = int(args.triton_buffer_mb * 2**20)
    if args.triton_config:
        values = [int(x) for x in args.triton_config.split(",")]
        keys = ("BLOCK_R", "BLOCK_C", "BLOCK_K", "num_warps", "num_stages")
        if len(values) != len(keys):
            raise SystemExit("--triton-config takes 5 comma-separated integers")
        logprobs_triton.GPU_CONFIG.update(zip(keys, values))
    return logprobs_triton


def _variants(args, cuda: bool, dtype: str, have_triton: bool) -> tuple[list[str], list[str]]:
    """(rows to run, rows skipped on this machine)."""
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown '{v}' (choose from {', '.join(VARIANTS)})")
    skipped = []
    if not cuda:  # torch.compile, Liger and Triton rows are measured on the GPU only; Triton's
        # row runs on CPU under its interpreter (TRITON_INTERPRET=1), as a dry run of the kernel, in
        # fp32 (the interpreter multiplies bf16 operands of tl.dot wrongly)
        skipped += [v for v in variants if v in ("compiled", "liger") or (v == "triton" and (
            os.environ.get("TRITON_INTERPRET") != "1" or dtype == "bf16"))]
    elif "liger" in variants and not _liger_available():
        skipped.append("liger")
    if not have_triton and "triton" in variants and "triton" not in skipped:
        skipped.append("triton")
    return [v for v in variants if v not in skipped], skipped


def _print_header(args, cuda, dtype, repeats, variants, skipped, logprobs_triton) -> None:
    print(f"token log-probs, forward+backward, {dtype}, logit scale {SCALE}, device {args.device}, "
          f"median of {repeats}" + (f" after {args.warmup} warm-up runs" if cuda else ""))
    cfg = logprobs_triton.GPU_CONFIG if logprobs_triton else {}
    if "triton" in variants:
        print(f"triton: buffer {logprobs_triton.BUFFER_BYTES / 2**20:.0f} MiB, tiles {cfg['BLOCK_R']}x"
              f"{cfg['BLOCK_C']}x{cfg['BLOCK_K']}, {cfg['num_warps']} warps, {cfg['num_stages']} stages")
    print("extra = peak memory above what was allocated before the step, gradients included; work = extra minus "
          "the gradients; TFLOP/s counts 6*N*H*V per step for every row (frozen head too)")
    print("vs compiled / vs liger: time ratio (< 1 is faster) and extra-memory ratio; vs naive: extra-memory ratio")
    if skipped:
        print(f"skipped rows: {', '.join(skipped)} ({'CUDA only' if not cuda else 'liger-kernel not importable'})")
    if cuda:
        print("max|dlogp|, grad rel: max log-prob error and relative hidden-gradient error against fp32 full logits")
    else:
        print("max|dlogp| is |sum of logp - naive's| / N (only sums come back from the CPU workers)")
    print(f"{'N':>6} {'H':>5} {'V':>6} {'head':>6} {'variant':>9} {'time ms':>9} {'extra MB':>9} {'work MB':>8} {'TFLOP/s':>8} "
          f"{'mem/naive':>9} {'vs compiled':>14} {'vs liger':>14} {'max|dlogp|':>10} {'grad rel':>9}")


def _cpu_worker(args, variant, size, frozen, dtype, repeats) -> dict:
    """One variant in its own process, so that peak RSS is its own."""
    N, H, V = size
    cmd = [sys.executable, "-m", "grpo_speech.bench.logprobs", "--worker", variant,
           "--size", f"{N}x{H}x{V}", "--repeats", str(repeats), "--chunk-size", str(args.chunk_size),
           "--device", args.device, "--dtype", dtype] + (["--frozen"] if frozen else []) \
        + (["--triton-config", args.triton_config] if args.triton_config else []) \
        + (["--triton-buffer-mb", str(args.triton_buffer_mb)] if args.triton_buffer_mb else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} worker for {N}x{H}x{V} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_shape(args, size, frozen, variants, dtype, repeats, cuda) -> None:
    """One table block: every variant on one shape, one printed line each."""
    import torch

    N, H, V = size
    rows = {}
    if cuda:  # fp32 full logits, the yardstick for every row's accuracy (naive's included)
        rows["reference"] = _fp32_reference(size, frozen, dtype, args.device)
        torch.cuda.empty_cache()
    for variant in variants:
        if cuda:
            r = _worker(variant, size, frozen, dtype, args.device, repeats, args.warmup, args.chunk_size)
            torch.cuda.empty_cache()  # each variant starts from the same allocator state
        else:
            r = _cpu_worker(args, variant, size, frozen, dtype, repeats)
        rows[variant] = r
        print(_line(r, rows, N, H, V, frozen), flush=True)
    rows.clear()
    if cuda:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    import torch

    # 1. Options, and the Triton settings they carry.
    args = _parser(torch.cuda.is_available()).parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats or (10 if cuda else 2)
    if repeats < 1 or args.chunk_size < 1:
        raise SystemExit("--repeats and --chunk-size must be >= 1")
    logprobs_triton = _triton_module(args)

    # 2. A CPU worker measures one variant on one shape and prints it as JSON.
    if args.worker:
        r = _worker(args.worker, _parse_sizes(args.size)[0], args.frozen, dtype, args.device, repeats, 0, args.chunk_size)
        r["logp_sum"] = None if r["logp"] is None else float(r["logp"].double().sum())
        r.pop("logp"), r.pop("grad_hidden")
        print(json.dumps(r))
        return

    # 3. Shapes and rows.
    if args.quick:
        frozen_sizes, train_sizes, repeats = _parse_sizes(QUICK_SIZES), _parse_sizes(QUICK_SIZES), min(repeats, 2)
    else:
        frozen_sizes = _parse_sizes(args.sizes if args.sizes is not None else (CUDA_SIZES if cuda else ""))
        train_sizes = _parse_sizes(args.train_sizes if args.train_sizes is not None else (CUDA_TRAIN_SIZES if cuda else CPU_SIZES))
    variants, skipped = _variants(args, cuda, dtype, logprobs_triton is not None)

    # 4. The table: a header, then one block of lines per shape.
    _print_header(args, cuda, dtype, repeats, variants, skipped, logprobs_triton)
    for size, frozen in [(s, True) for s in frozen_sizes] + [(s, False) for s in train_sizes]:
        _run_shape(args, size, frozen, variants, dtype, repeats, cuda)


def _line(r: dict, rows: dict, N: int, H: int, V: int, frozen: bool) -> str:
    ms = r["time_s"] * 1e3
    extra = r["peak_extra_mb"]
    tflops = 6 * N * H * V / r["time_s"] / 1e12

    def vs(other):
        o = rows.get(other)
        if o is None or o is r:
            return "-"
        return f"{r['time_s'] / o['time_s']:.2f}x {extra / o['peak_extra_mb']:.2f}m"

    naive = rows.get("naive")
    mem_naive = f"{extra / naive['peak_extra_mb']:.1%}" if naive else "-"
    # Accuracy on the same inputs: on CUDA against fp32 full logits (max log-prob error, relative
    # error of the hidden gradient), on CPU (fp32 throughout) against the naive row, from sums.
    # Liger's loss is a cross-entropy, not these log-probs: not compared.
    dlogp = grad_rel = "-"
    ref = rows.get("reference")
    if r["variant"] != "liger":
        if ref is not None:
            dlogp = f"{(r['logp'].float() - ref['logp']).abs().max().item():.1e}"
            g, g0 = r["grad_hidden"].float(), ref["grad_hidden"]
            grad_rel = f"{((g - g0).norm() / g0.norm()).item():.1e}"
        elif naive is not None and r is not naive and "logp_sum" in r:
            dlogp = f"{abs(r['logp_sum'] - naive['logp_sum']) / N:.1e}"
    head = "frozen" if frozen else "train"
    return (f"{N:>6} {H:>5} {V:>6} {head:>6} {r['variant']:>9} {ms:>9.2f} {extra:>9.0f} {extra - r['grads_mb']:>8.0f} {tflops:>8.0f} "
            f"{mem_naive:>9} {vs('compiled'):>14} {vs('liger'):>14} {dlogp:>10} {grad_rel:>9}")


if __name__ == "__main__":
    main(sys.argv[1:])
