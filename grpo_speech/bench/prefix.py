"""Shared-prefix log-prob passes against per-row ones, side by side in one run.

    python -m grpo_speech bench prefix                    # CPU: the three cases, a few minutes
    python -m grpo_speech bench prefix --device cuda --layers 40   # the whole 2B depth on a GPU

What a training step runs on a micro-batch of P prompts x G completions: the reference forward
(no gradient) and the policy forward and backward, through `sequence_logprobs` with
shared_prefix=False (one [prompt ; completion] row per sample) and True (prefix.py). Cases:
  a  the embedded tiny base on the ast config: its prompts (2.1 s clips, the ast instruction),
     G = 8, 20 completion tokens (the default's rollouts are 15-20 long);
  b  a Granite-Speech-2B-shaped decoder (hidden 2048, 32 query / 8 key-value heads, MLP 8192,
     vocabulary 49160; --layers of its 40) training a LoRA (r = 64 on q/v) as the Granite YAMLs
     do: 200-token prompts, G = 8, 40 completion tokens;
  c  the same with 200 completion tokens.
Printed per case: the token-count ratio (Lp + G*T) / (G*(Lp + T)), the measured time ratio
shared / per-row (best of --reps, the two interleaved), and the memory of each: peak allocated on
CUDA; on CPU the bytes autograd saves for the backward (activation memory; CPU has no allocator
statistics). The first log-probs of both passes are compared as a check.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GraniteSpeechForConditionalGeneration

from grpo_speech.model import GRANITE_2B_SIZES, set_trainable, tiny_config
from grpo_speech.rollout import encode_audio, sequence_logprobs


def _tiny_case(device, dtype, P: int):
    """The embedded base, set up as experiments/tiny/ast_grpo.yaml trains it, with ast prompts."""
    from grpo_speech.config import load_config
    from grpo_speech.data.collate import chat_prompt
    from grpo_speech.data.prompts import run_prompts
    from grpo_speech.model import load_model

    cfg = load_config("experiments/tiny/ast_grpo.yaml", [])
    model, proc = load_model(cfg.model)
    prompts = run_prompts(cfg, proc.tokenizer)
    g = torch.Generator().manual_seed(0)
    texts = [chat_prompt(proc.tokenizer, prompts.templates[i % len(prompts.templates)], prompts.system)
             for i in range(P)]
    audio = [torch.randn(int(16000 * (1.8 + 0.3 * i)), generator=g) * 0.1 for i in range(P)]
    batch = dict(proc(texts, audio, return_tensors="pt"))
    return model.to(device, dtype).eval(), batch


def _granite_case(device, dtype, P: int, Lp: int, layers: int):
    """A 2B-shaped decoder (random weights) training the released model's LoRA (r = 64 on q/v, as
    the Granite YAMLs do), and P text prompts of Lp tokens: the decoder's cost does not depend on
    whether prompt positions hold audio or text embeddings."""
    from peft import LoraConfig

    sizes = {**GRANITE_2B_SIZES, "lm_layers": layers, "enc_layers": 1, "dropout": 0.0}
    torch.manual_seed(0)
    with torch.device(device):
        model = GraniteSpeechForConditionalGeneration(tiny_config(49160, 49159, **sizes))
        model.add_adapter(LoraConfig(r=64, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.config.has_lora_adapter = True
    set_trainable(model, "lora")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (P, Lp), generator=g)
    return model.to(dtype).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _passes(model, batch, audio, ids_BT, mask_BT, G, shared):
    """Reference forward (no gradient), then policy forward and backward, as a step runs them."""
    with torch.no_grad():
        sequence_logprobs(model, batch, audio, ids_BT, mask_BT, group_size=G, shared_prefix=shared)
    lp = sequence_logprobs(model, batch, audio, ids_BT, mask_BT, group_size=G, shared_prefix=shared)
    lp.sum().backward()
    model.zero_grad(set_to_none=True)
    return lp.detach()


def _measure(fn, device):
    """(seconds, bytes): peak allocated on CUDA, bytes saved for backward on CPU."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(), out
    return time.perf_counter() - t0, saved[0], out


def run_case(name, model, batch, *, G, T, reps, device):
    batch = {k: v.to(device) for k, v in batch.items()}
    P, Lp = batch["input_ids"].shape
    with torch.no_grad():
        audio = encode_audio(model, batch)  # the rollout's embeddings, reused by both passes
    g = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, 400, (P * G, T), generator=g).to(device)
    mask_BT = torch.ones_like(ids_BT)
    best = {True: (float("inf"), 0), False: (float("inf"), 0)}
    outs = {}
    for _ in range(reps):
        for shared in (False, True):  # interleaved: machine noise hits both alike
            sec, mem, outs[shared] = _measure(lambda: _passes(model, batch, audio, ids_BT, mask_BT, G, shared), device)
            best[shared] = (min(best[shared][0], sec), max(best[shared][1], mem))
    diff = float((outs[True] - outs[False]).abs().max())
    tokens = (Lp + G * T) / (G * (Lp + T))
    ratio = best[True][0] / best[False][0]
    return dict(case=name, P=P, G=G, Lp=Lp, T=T, tokens=tokens, ratio=ratio, row_s=best[False][0],
                shared_s=best[True][0], row_mb=best[False][1] / 2**20, shared_mb=best[True][1] / 2**20, diff=diff)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="grpo_speech bench prefix", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--cases", default="a,b,c", help="comma list of a, b, c")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 2B shape (the model has 40; with "
                    "fewer, the LM head, the same work in both passes, weighs more than in the real model)")
    ap.add_argument("--prompts", type=int, default=2, help="P prompts per micro-batch (tiny: its 16 rows)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions of each pass (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0: leave as is)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"shared-prefix vs per-row log-prob passes on {where}, {dtype}", flush=True)
    G, results = args.group_size, []
    for case in args.cases.split(","):
        if case == "a":
            model, batch = _tiny_case(device, dtype, args.prompts)
            T, label = 20, "a: tiny base, ast prompts"
        elif case in ("b", "c"):
            T = 40 if case == "b" else 200
            model, batch = _granite_case(device, dtype, max(1, args.prompts // 2), 200, args.layers)
            label = f"{case}: 2B shape, {args.layers} layer(s)"
        else:
            raise SystemExit(f"unknown case {case!r}: expected a, b or c")
        results.append(run_case(label, model, batch, G=G, T=T, reps=args.reps, device=device))
        r = results[-1]
        print(f"  {label}: per-row {r['row_s']:.2f} s, shared {r['shared_s']:.2f} s", flush=True)
        del model
    mem = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"\n| case | P x G | Lp | T | token ratio | time ratio | time / token ratio | per-row s | shared s "
          f"| per-row {mem} | shared {mem} | max diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['P']} x {r['G']} | {r['Lp']} | {r['T']} | {r['tokens']:.3f} | {r['ratio']:.3f} "
              f"| {r['ratio'] / r['tokens']:.2f} | {r['row_s']:.2f} | {r['shared_s']:.2f} | {r['row_mb']:,.0f} "
              f"| {r['shared_mb']:,.0f} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
