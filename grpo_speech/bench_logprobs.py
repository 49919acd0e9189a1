"""Benchmark: chunked token log-probs against full logits (log_softmax + gather), forward+backward.

    python -m grpo_speech bench logprobs                         # Granite 2B and 8B head shapes
    python -m grpo_speech.bench_logprobs --sizes 1600x2048x49160 --repeats 3 --device cuda

Each variant runs in its own subprocess so that its peak resident memory is its own. Hidden states
and the LM head both require grad, as with a trainable tied head.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

DEFAULT_SIZES = "1600x2048x49160,1600x4096x49160"  # N = 8 x 200 tokens; Granite 3.3 2B / 8B head
VARIANTS = ("naive", "chunked")


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


def _worker(args) -> dict:
    import torch

    from grpo_speech.logprobs import token_logprobs

    N, H, V = args.size
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=device).requires_grad_()
    weight = torch.randn(V, H, device=device).mul_(3.0 / H ** 0.5).requires_grad_(not args.frozen_head)
    targets = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)
    scale = 8.0  # Granite 2B's logits_scaling; any value costs the same

    def step(hidden, weight, targets, upstream):
        if args.variant == "naive":
            logp = torch.log_softmax((hidden @ weight.t()) / scale, dim=-1).gather(1, targets[:, None])[:, 0]
        else:
            logp = token_logprobs(hidden, weight, targets, logit_scale=scale, chunk_size=args.chunk_size)
        (logp * upstream).sum().backward()
        return logp.detach()

    # A tiny run first, so that one-time library set-up (BLAS, OpenMP and autograd threads, some
    # 30 MB on CPU) is not counted as the variant's working memory.
    tiny = [x[:8].detach().clone().requires_grad_(x.requires_grad) for x in (hidden, weight)]
    step(*tiny, targets[:8] % 8, upstream[:8])
    # Peak above the memory held just before each repeat (after the previous repeat's gradients
    # are dropped), worst repeat kept. On CPU that baseline includes heap memory glibc kept from
    # the repeat before, which the next one reuses.
    times, cpu_times, extras = [], [], []
    reset = True
    for _ in range(args.repeats):
        hidden.grad = None
        weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset = _reset_peak_rss() and reset
            base = _status_kb("VmRSS") * 1024
        t0, c0 = time.perf_counter(), time.process_time()
        logp = step(hidden, weight, targets, upstream)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
        extras.append((peak - base) / 2**20)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in (hidden, weight) if p.grad is not None)
    return {
        "variant": args.variant, "N": N, "H": H, "V": V, "device": str(device),
        "time_s": min(times), "times_s": times, "cpu_s": min(cpu_times),
        "peak_extra_mb": max(extras), "extras_mb": extras,
        "grads_mb": grads / 2**20,
        "weight_mb": weight.numel() * weight.element_size() / 2**20,
        "peak_reset": reset,
        "logp_sum": float(logp.double().sum()),
    }


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--sizes: '{item}' is not NxHxV (e.g. 1600x2048x49160)")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def main(argv: list[str] | None = None) -> None:
    import torch

    from grpo_speech.logprobs import DEFAULT_CHUNK_SIZE

    p = argparse.ArgumentParser(prog="grpo_speech bench logprobs", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxHxV (rows x hidden x vocab)")
    p.add_argument("--repeats", type=int, default=2, help="forward+backward runs per variant; the min time is kept")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows of logits per chunk")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frozen-head", action="store_true", help="the LM head does not require grad (LoRA-only)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.chunk_size < 1:
        raise SystemExit("--repeats and --chunk-size must be >= 1")

    if args.worker:
        args.variant, args.size = args.worker, _parse_sizes(args.size)[0]
        print(json.dumps(_worker(args)))
        return

    cuda = args.device.startswith("cuda")
    head = "frozen head" if args.frozen_head else "head and hidden require grad"
    print(f"token log-probs, forward+backward, fp32, {head}, device {args.device}, "
          f"chunk_size {args.chunk_size}, min of {args.repeats}")
    print("extra = peak memory above the inputs; work = extra minus the gradients themselves "
          "(grad W is as large as W, for both variants)")
    print("time = wall seconds; cpu = CPU seconds of all threads, steadier when cores are shared")
    cols = f"{'N':>5} {'H':>5} {'V':>6} {'variant':>8} {'time s':>8} {'cpu s':>7} {'extra MB':>9} {'work MB':>8}"
    print(cols + (f" {'TFLOP/s':>8}" if cuda else ""))
    for N, H, V in _parse_sizes(args.sizes):
        rows = {}
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "grpo_speech.bench_logprobs", "--worker", variant,
                   "--size", f"{N}x{H}x{V}", "--repeats", str(args.repeats),
                   "--chunk-size", str(args.chunk_size), "--device", args.device]
            if args.frozen_head:
                cmd.append("--frozen-head")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{variant} worker for {N}x{H}x{V} failed:\n{out.stderr[-2000:]}")
            r = rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            r["work_mb"] = r["peak_extra_mb"] - r["grads_mb"]
            line = (f"{N:>5} {H:>5} {V:>6} {variant:>8} {r['time_s']:>8.2f} {r['cpu_s']:>7.2f} "
                    f"{r['peak_extra_mb']:>9.0f} {r['work_mb']:>8.0f}")
            if cuda:
                # Model FLOPs: 2NHV forward + 4NHV backward, whatever each variant recomputes.
                line += f" {6 * N * H * V / r['time_s'] / 1e12:>8.1f}"
            print(line, flush=True)
        n, c = rows["naive"], rows["chunked"]
        rel = abs(c["logp_sum"] - n["logp_sum"]) / abs(n["logp_sum"])
        print(f"{'':>18} ratio chunked/naive: time {c['time_s'] / n['time_s']:.2f}x, cpu {c['cpu_s'] / n['cpu_s']:.2f}x, "
              f"extra {c['peak_extra_mb'] / n['peak_extra_mb']:.1%}, work {c['work_mb'] / n['work_mb']:.1%}; "
              f"W is {n['weight_mb']:.0f} MB; sum(logp) agrees to {rel:.1e}"
              + ("" if n["peak_reset"] else " (peak RSS not resettable here: includes set-up)"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
