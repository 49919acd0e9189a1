"""Rollout benchmark: our group sampler against transformers' generate(num_return_sequences=G).

    python -m grpo_speech bench rollout --device cuda                   # H200 table, about 4 min
    python -m grpo_speech bench rollout --device cpu --shape tiny --rows 16,32 --new-tokens 16 --threads 1  # dry run, 10 s

One model and one batch for every sampler: by default a Granite-Speech-2B-shaped model (40
layers, real widths, vocab 49160, random weights, bf16), 6 s clips in about 85-token prompts,
G = 8, 200 completion tokens forced (EOS banned until then), at 64 and 256 rows (P = 8 and 32).
Samplers: ours with the static KV cache (CUDA graphs on a GPU; the line says which path ran),
ours with the dynamic cache (eager, the reference loop), generate() with the dynamic cache, and
generate() with cache_implementation="static" (compiled by transformers on a GPU; its first call,
the compilation, takes about a minute on an H200 and is not timed). Times: best of --reps after
one warm-up call; ms per decode step = wall time / completion length.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GraniteSpeechForConditionalGeneration

from grpo_speech.model import (
    AUDIO_TOKEN, GRANITE_2B_SIZES, build_tiny_model, build_tokenizer, forward_logit_scale, logit_scale, tiny_config,
)
from grpo_speech.rollout import sample_groups
from grpo_speech.static_decode import release_rollout_cache

_WORDS = ("the cat sits on the mat while a man reads a book near the river in the morning "
          "die Katze sitzt auf der Matte während ein Mann ein Buch am Fluss liest").split()
SAMPLERS = ("ours-static", "ours-dynamic", "hf-dynamic", "hf-static")


def _model(shape: str, tok, device, dtype):
    torch.manual_seed(0)
    if shape == "tiny":
        model, proc = build_tiny_model(tok)
    elif shape == "granite-2b":
        # vocab 49160 as the real model; the small tokenizer only writes the first ids of prompts.
        _, proc = build_tiny_model(tok)
        with torch.device(device):  # random init on the device: seconds, not minutes
            model = GraniteSpeechForConditionalGeneration(
                tiny_config(49160, tok.convert_tokens_to_ids(AUDIO_TOKEN), **GRANITE_2B_SIZES))
    else:
        raise ValueError(f"unknown shape {shape!r}: expected granite-2b or tiny")
    return model.to(device, dtype).eval(), proc


def _batch(proc, P: int, seconds: float, words: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    texts = [f"<|audio|> {' '.join(_WORDS[(i + j) % len(_WORDS)] for j in range(words))}" for i in range(P)]
    audio = [torch.randn(int(16000 * seconds), generator=g) * 0.1 for _ in range(P)]
    batch = proc(texts, audio, return_tensors="pt").to(device)
    batch["input_features"] = batch["input_features"].to(dtype)  # generate() feeds them as they are
    return batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(name, model, batch, tok, G, N, device):
    """One rollout of P*G rows x N tokens; returns (completion tokens, decode path)."""
    if name.startswith("ours"):
        gen = torch.Generator(device).manual_seed(0)
        r = sample_groups(model, batch, group_size=G, max_new_tokens=N, min_new_tokens=N, temperature=1.0,
                          tokenizer=tok, generator=gen, sampler=name.split("-")[1])
        return int(r.mask_BT.sum()), r.decode_path
    static = name == "hf-static"
    # Temperature 1 of the trained model: generate() samples from the installed forward's logits,
    # which in transformers 5.x lack Granite's division by logits_scaling (model.logit_scale).
    temperature = logit_scale(model) / forward_logit_scale(model)
    out = model.generate(**batch, do_sample=True, num_return_sequences=G, max_new_tokens=N,
                         min_new_tokens=N, temperature=temperature, top_p=1.0, top_k=0,
                         suppress_tokens=[model.config.audio_token_id], eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **({"cache_implementation": "static"} if static else {}))
    compiled = static and device.type == "cuda"
    return (out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]),
            "static cache, compiled" if compiled else ("static cache, eager" if static else "dynamic cache"))


def _clips_encoded(model, fn):
    clips = []
    hook = model.model.encoder.register_forward_hook(lambda m, i, o: clips.append(i[0].shape[0]))
    try:
        result = fn()
    finally:
        hook.remove()
    return sum(clips), result


@torch.no_grad()
def bench(model, proc, tok, *, rows, G, N, seconds, words, samplers, reps, device):
    P = rows // G
    batch = _batch(proc, P, seconds, words, device, next(model.parameters()).dtype)
    Tp = batch["input_ids"].shape[1]
    print(f"\n{rows} rows: P={P} prompts x G={G}, {Tp}-token prompts, {N} completion tokens", flush=True)
    results = {}
    for name in samplers:
        fast = name in ("ours-static", "hf-static")
        t0 = time.perf_counter()
        clips, (tokens, path) = _clips_encoded(model, lambda: _run(name, model, batch, tok, G, N, device))
        _sync(device)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps if fast else 1):
            t0 = time.perf_counter()
            tokens, path = _run(name, model, batch, tok, G, N, device)
            _sync(device)
            times.append(time.perf_counter() - t0)
        assert tokens == rows * N, (name, tokens)
        best = min(times)
        results[name] = dict(path=path, tok_s=tokens / best, ms_step=best / N * 1e3, clips=clips, first=first)
        print(f"  {name:13} done: first call {first:.1f} s, timed {', '.join(f'{t:.2f}' for t in times)} s",
              flush=True)
    if "ours-static" in samplers:
        release_rollout_cache(model)  # free the KV cache before the next batch size
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="grpo_speech bench rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, choices=["granite-2b", "tiny"],
                    help="default: granite-2b on cuda, tiny (the embedded default's sizes) on cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--rows", default="64,256", help="comma list of P*G")
    ap.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=200, help="completion length (EOS banned before it)")
    ap.add_argument("--seconds", type=float, default=6.0, help="clip length (6 s: 60 audio tokens)")
    ap.add_argument("--words", type=int, default=20, help="words of text in each prompt")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)}")
    ap.add_argument("--reps", type=int, default=2, help="timed calls of the fast samplers (eager ones: 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on cpu (0: leave as is)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    samplers = [s.strip() for s in args.samplers.split(",")]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown:
        raise SystemExit(f"unknown samplers {sorted(unknown)}: expected {', '.join(SAMPLERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok = build_tokenizer([" ".join(_WORDS)] * 20, vocab_size=1000)
    shape = args.shape or ("granite-2b" if device.type == "cuda" else "tiny")
    model, proc = _model(shape, tok, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{shape} model ({n_params / 1e9:.2f} B parameters, {dtype}) on {where}, built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        res = bench(model, proc, tok, rows=rows, G=args.group_size, N=args.new_tokens, seconds=args.seconds,
                    words=args.words, samplers=samplers, reps=args.reps, device=device)
        table.append((rows, res))
    print(f"\n| sampler | path | rows | completion tokens/s | ms per decode step | vs HF static | clips encoded |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for rows, res in table:
        ref = res.get("hf-static", {}).get("tok_s")
        for name, r in res.items():
            ratio = f"{r['tok_s'] / ref:.2f}x" if ref else "-"
            print(f"| {name} | {r['path']} | {rows} | {r['tok_s']:,.0f} | {r['ms_step']:.1f} | {ratio} | {r['clips']} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
