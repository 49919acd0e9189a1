"""Device check: three GRPO steps of the real `train(cfg)` loop on one GPU, Granite-Speech-2B shaped.

    python -m grpo_speech bench gpu                     # also: make bench-gpu (about 3 minutes on an H200)
    python -m grpo_speech bench gpu --device cpu --small  # dry run of the same path on a CPU

The model has the real 2B widths and depths (encoder 16 x 1024, LM 40 x 2048, vocab 49160) with
random weights, a LoRA of rank 64 on q/v as the trainable part, bf16 compute over float32 master
weights, and gradient checkpointing; the tokenizer covers the whole vocabulary (BPE on the
synthetic corpus of the tiny base plus plain filler tokens), so any sampled id decodes. G = 8 completions of
exactly 200 tokens (EOS banned until then) for P = 8 spoken passages. It asserts that parameters
and activations live on the GPU and prints the step time split into rollout, log-prob passes
(old/reference forward, policy forward + backward) and optimizer, with tokens/s and peak memory.
Runs offline: the speech is synthesized with eSpeak NG into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from grpo_speech.config import load_config
from grpo_speech.model import GRANITE_2B_SIZES, build_tiny_model, default_base_path


def build_model_dir(out: Path, vocab_size: int, sizes: dict, device: torch.device) -> None:
    """A Granite Speech directory with random weights (saved in bf16 to halve the I/O; the loop
    loads float32 masters from it) and a tokenizer of exactly `vocab_size` ids."""
    from transformers import GraniteSpeechProcessor

    tok = GraniteSpeechProcessor.from_pretrained(default_base_path()).tokenizer  # BPE of the synthetic corpus
    tok.add_tokens([f"w{i}" for i in range(vocab_size - len(tok))])  # plain words: they decode as text
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model, proc = build_tiny_model(tok, **sizes)
    model.to(torch.bfloat16).save_pretrained(out)
    proc.save_pretrained(out)


def write_long_clips(out: Path, n_rows: int, passages_per_clip: int = 3) -> float:
    """A LibriSQA-format dataset of clips of about 8 s: each clip is `passages_per_clip`
    synthetic sqa passages read one after another, asked about the first. Returns the mean length."""
    import numpy as np
    import soundfile as sf

    from grpo_speech.data.audio import SAMPLE_RATE, read_audio
    from grpo_speech.data.synth import synthesize

    k = passages_per_clip
    synthesize("sqa", str(out / "synth"), n_rows * k, 1, k, seed=0)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    seconds = []
    for split, name in (("train", "librisqa_train.json"), ("test", "librisqa_test.json")):
        rows = [json.loads(line) for line in (out / "synth" / f"{split}.jsonl").read_text().splitlines()]
        clips = []
        for i in range(len(rows) // k):
            part = rows[i * k:(i + 1) * k]
            wave = np.concatenate([read_audio(out / "synth" / r["audio"]) for r in part])
            path = out / "clips" / f"{split}-{i:04d}.flac"
            sf.write(path, wave, SAMPLE_RATE)
            seconds.append(len(wave) / SAMPLE_RATE)
            clips.append({"speech_path": str(path), "text": " ".join(r["text"] for r in part),
                          "question": part[0]["question"], "answer": part[0]["answer"]})
        (out / name).write_text(json.dumps(clips))
    return statistics.mean(seconds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="grpo-speech bench gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="2 layers, 16 new tokens, G=4, P=2 (dry run)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench gpu: no CUDA device (use --device cpu --small for a dry run)")

    sizes = dict(GRANITE_2B_SIZES)
    P, G, N = 8, 8, 200
    if args.small:
        sizes.update(enc_layers=2, lm_layers=2)
        P, G, N = 2, 4, 16
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_gpu_"))
    t0 = time.perf_counter()
    build_model_dir(work / "model", 49160, sizes, device)
    t_build = time.perf_counter() - t0
    print(f"built {work / 'model'} in {t_build:.0f} s", flush=True)
    seconds = write_long_clips(work / "data", n_rows=3 * P)
    print(f"{3 * P} training clips of {seconds:.1f} s on average", flush=True)

    cfg = load_config(None, [
        "method=grpo", "task=sqa", f"run.dir={work / 'run'}", "run.evaluate=false", "run.overwrite=true",
        f"model.path={work / 'model'}", "model.dtype=bfloat16", "model.train=lora", "model.lora_rank=64",
        "model.gradient_checkpointing=true",
        "data.source=librisqa", f"data.dir={work / 'data'}", "data.val_fraction=0.2",
        f"grpo.group_size={G}", f"grpo.max_new_tokens={N}", f"grpo.min_new_tokens={N}",
        f"train.prompts_per_step={P}", f"train.max_steps={args.steps}", "train.micro_batch_size=16",
        "train.lr=1e-5", "train.warmup_ratio=0", f"train.save_every={args.steps}",
    ])
    seen = _watch_devices()
    from grpo_speech.train import train

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg)
    t_train = time.perf_counter() - t0
    seen.remove()

    bad = sorted(k for k, devs in seen.devices.items() if any(d != device.type for d in devs))
    assert seen.calls > 0, "no module ran"
    assert not bad, f"tensors off {device.type}: {bad[:10]}"
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/step" in r]
    _report(steps, P, G, N, device, t_build, t_train, seen.calls)


def _report(steps: list[dict], P: int, G: int, N: int, device, t_build: float, t_train: float,
            calls: int) -> None:
    print(f"\nGRPO steps on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: "
          f"P={P} x G={G}, {N} new tokens; parameters and activations on {device.type} "
          f"({calls} module calls checked)")
    print("| step | rollout s | log-prob passes s | optimizer s | step s | rollout tokens/s | peak GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in steps:
        tokens = r["rollout/len_mean"] * P * G
        print(f"| {r['step']} | {r['time/rollout']:.2f} | {r['time/logprobs']:.2f} | {r['time/optimizer']:.3f} "
              f"| {r['time/step']:.2f} | {tokens / r['time/rollout']:,.0f} | {r.get('mem/peak_gb', 0.0):.1f} |")
    later = steps[1:] or steps
    print(f"\nsteps after the first: {statistics.mean(r['time/step'] for r in later):.2f} s per step "
          f"(rollout {statistics.mean(r['time/rollout'] for r in later):.2f} s); "
          f"model build {t_build:.0f} s, train() in all {t_train:.0f} s", flush=True)


class _watch_devices:
    """A global forward hook that notes the device of every module's parameters and outputs."""

    def __init__(self) -> None:
        self.devices: dict[str, set[str]] = {}
        self.calls = 0
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, _inputs, output) -> None:
        if type(module).__module__.startswith("torchaudio"):
            return  # the processor's mel features: the data pipeline, on the CPU by design
        self.calls += 1
        name = type(module).__name__
        for p in module.parameters(recurse=False):
            self.devices.setdefault(f"{name} parameter", set()).add(p.device.type)
        for t in output if isinstance(output, (tuple, list)) else [getattr(output, "last_hidden_state", output)]:
            if isinstance(t, torch.Tensor):
                self.devices.setdefault(f"{name} output", set()).add(t.device.type)

    def remove(self) -> None:
        self._handle.remove()
