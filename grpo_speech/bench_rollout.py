"""Rollout benchmark: our group sampler vs generate(num_return_sequences=G) + a log-prob forward.

    python -m grpo_speech bench rollout                       # tiny default and Granite-shaped rows
    python -m grpo_speech bench rollout --configs tiny --prompts 8 --new-tokens 64

Both sides sample the same number of tokens (EOS banned until max_new_tokens) from the same
random-weight model and batch, then compute log-probs of the completions. Encoder passes are
counted with a forward hook. Timings: best of --reps runs (the machine may be shared), ours and peer interleaved.
"""
from __future__ import annotations

import argparse
import time

import torch

from transformers import GraniteSpeechForConditionalGeneration

from grpo_speech.model import (
    AUDIO_TOKEN, GRANITE_2B_SIZES, TINY_SIZES, build_tiny_model, build_tokenizer, tiny_config,
)
from grpo_speech.rollout import expand_to_group, sample_groups, sequence_logprobs

_WORDS = ("the cat sits on the mat while a man reads a book near the river in the morning "
          "die Katze sitzt auf der Matte während ein Mann ein Buch am Fluss liest").split()
# Real widths, 2 layers each: the Granite 3.3 2B shape with less depth.
GRANITE_SHAPED = {**GRANITE_2B_SIZES, "enc_layers": 2, "lm_layers": 2}


def _model(name: str, tok):
    torch.manual_seed(0)
    if name == "tiny":
        return build_tiny_model(tok)
    if name == "granite":
        # vocab 49160 as the real model; the small tokenizer only reads the first ids.
        _, proc = build_tiny_model(tok, **TINY_SIZES)
        model = GraniteSpeechForConditionalGeneration(
            tiny_config(49160, tok.convert_tokens_to_ids(AUDIO_TOKEN), **GRANITE_SHAPED))
        return model, proc
    raise ValueError(f"unknown bench config {name!r}: expected tiny or granite")


def _batch(proc, P: int, seconds: float):
    g = torch.Generator().manual_seed(0)
    texts = [f"<|audio|> {' '.join(_WORDS[i % 7: i % 7 + 4 + i % 3])}" for i in range(P)]
    audio = [torch.randn(int(16000 * seconds * (1 - 0.1 * (i % 3))), generator=g) * 0.1 for i in range(P)]
    return proc(texts, audio, return_tensors="pt")


def _ours(model, batch, tok, G, N):
    r = sample_groups(model, batch, group_size=G, max_new_tokens=N, min_new_tokens=N, temperature=1.0,
                      tokenizer=tok, generator=torch.Generator().manual_seed(0))
    sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, group_size=G)
    return int(r.mask_BT.sum())


def _peer(model, batch, tok, G, N):
    audio_id = model.config.audio_token_id
    out = model.generate(**batch, do_sample=True, num_return_sequences=G, max_new_tokens=N, min_new_tokens=N,
                         temperature=1.0, top_p=1.0, top_k=0, suppress_tokens=[audio_id],
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Tp = batch["input_ids"].shape[1]
    completion = out[:, Tp:]
    attn = torch.cat([expand_to_group(batch["attention_mask"], G), torch.ones_like(completion)], dim=1)
    logits = model(input_ids=out, attention_mask=attn,
                   input_features=expand_to_group(batch["input_features"], G),
                   input_features_mask=expand_to_group(batch["input_features_mask"], G)).logits
    logits[:, Tp - 1:-1].float().log_softmax(-1).gather(2, completion[..., None])
    return completion.numel()


def _encoder_clips(model, fn):
    clips = []
    hook = model.model.encoder.register_forward_hook(lambda m, i, o: clips.append(i[0].shape[0]))
    try:
        fn()
    finally:
        hook.remove()
    return len(clips), sum(clips)


@torch.no_grad()
def bench_config(name, tok, *, P, G, N, seconds, reps):
    model, proc = _model(name, tok)
    model.eval()
    batch = _batch(proc, P, seconds)
    n_params = sum(p.numel() for p in model.parameters())
    ours_passes = _encoder_clips(model, lambda: _ours(model, batch, tok, G, N))  # also warms up
    peer_passes = _encoder_clips(model, lambda: _peer(model, batch, tok, G, N))
    t_ours, t_peer = [], []
    for _ in range(reps):
        for fn, times in ((_ours, t_ours), (_peer, t_peer)):
            t0 = time.perf_counter()
            tokens = fn(model, batch, tok, G, N)
            times.append(time.perf_counter() - t0)
    assert tokens == P * G * N
    ours, peer = min(t_ours), min(t_peer)
    return dict(config=name, params_M=n_params / 1e6, P=P, G=G, N=N,
                ours_tok_s=P * G * N / ours, peer_tok_s=P * G * N / peer, speedup=peer / ours,
                ours_encoder=ours_passes, peer_encoder=peer_passes)


@torch.no_grad()
def bench_context_size(tok, seconds: float, reps: int):
    """Tiny encoder time on 8 clips with the real attention block (200 frames, 4 s) vs 50: every
    clip is padded to a whole block, so short clips gain most."""
    out = {}
    for ctx in (200, 50):
        torch.manual_seed(0)
        model, proc = build_tiny_model(tok, context_size=ctx)
        model.eval()
        feats = _batch(proc, 8, seconds)["input_features"]
        model.model.encoder(feats)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.model.encoder(feats)
            times.append(time.perf_counter() - t0)
        out[ctx] = min(times)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="grpo_speech bench rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,granite", help="comma list of tiny, granite")
    ap.add_argument("--prompts", type=int, default=4, help="P prompts")
    ap.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="completion length (EOS banned before it)")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer([" ".join(_WORDS)] * 20, vocab_size=1000)
    print(f"device cpu, {torch.get_num_threads()} threads; P={args.prompts} G={args.group_size} "
          f"N={args.new_tokens} tokens, {args.seconds:g} s clips, best of {args.reps}")
    print(f"{'config':8} {'params':>8} {'ours tok/s':>11} {'peer tok/s':>11} {'ours/peer':>10} "
          f"{'encoder calls/clips ours':>25} {'peer':>8}")
    for name in args.configs.split(","):
        r = bench_config(name.strip(), tok, P=args.prompts, G=args.group_size, N=args.new_tokens,
                         seconds=args.seconds, reps=args.reps)
        print(f"{r['config']:8} {r['params_M']:7.1f}M {r['ours_tok_s']:11.1f} {r['peer_tok_s']:11.1f} "
              f"{r['speedup']:9.2f}x {'%d/%d' % r['ours_encoder']:>25} {'%d/%d' % r['peer_encoder']:>8}")
    for seconds in (1.0, 4.0):
        ctx = bench_context_size(tok, seconds, max(args.reps, 5))  # cheap: more runs against noise
        print(f"tiny encoder, 8 clips of {seconds:g} s: context_size 200 {ctx[200] * 1e3:.1f} ms, "
              f"50 {ctx[50] * 1e3:.1f} ms ({ctx[200] / ctx[50]:.2f}x)")


if __name__ == "__main__":
    main()
