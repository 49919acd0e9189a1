"""Command line: `python -m grpo_speech <command>` (also installed as `grpo-speech`).

    python -m grpo_speech synth --task ast --out data/synthetic/ast
    python -m grpo_speech train --config experiments/tiny/ast_grpo.yaml train.max_steps=10
    torchrun --nproc_per_node=4 -m grpo_speech train --config experiments/granite-speech-2b/ast_grpo.yaml
    python -m grpo_speech score --hyp hyp.txt --ref ref.txt --lang de
"""
from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of config overrides (see grpo_speech/config.py)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. grpo.beta=0.04")


def _load(args):
    from grpo_speech.config import load_config
    overrides = list(args.overrides)
    if args.resume:
        overrides += ["resume=true", f"run.dir={args.resume}"]
        if not args.config:
            from pathlib import Path
            saved = Path(args.resume) / "config.yaml"
            if saved.exists():
                args.config = str(saved)
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-speech",
        description="GRPO for speech-aware language models (speech in, text out).")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("synth", help="synthesize a spoken dataset offline with eSpeak NG")
    p.add_argument("--task", choices=("ast", "sqa", "asr"), required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", choices=("target", "pretrain"), default="target",
                   help="target: the evaluation distribution; pretrain: other templates and words")

    p = sub.add_parser("pretrain", help="train the tiny embedded base model from scratch", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the pretraining recipe")

    p = sub.add_parser("train", help="SFT, GRPO or MP-GRPO training (method=...)")
    _config_args(p)

    p = sub.add_parser("eval", help="score a model on the test split with all six metrics")
    _config_args(p)

    p = sub.add_parser("score", help="score a hypothesis file against a reference file")
    p.add_argument("--hyp", required=True, help="hypotheses, one sentence a line")
    p.add_argument("--ref", required=True, help="references, one sentence a line")
    p.add_argument("--lang", default="en", help="language of the texts (en, de, ...)")

    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios", add_help=False)
    p.add_argument("which", choices=("logprobs", "rollout", "gpu"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # pretrain and bench hand their options, in order, on to their own parsers (argparse would
    # split "--steps 50" between its known and unknown lists).
    if argv and argv[0] in ("pretrain", "bench"):
        own = [a for a in argv[1:] if a != "--"]
        args = argparse.Namespace(command=argv[0], args=own)
        if argv[0] == "bench":
            if not own or own[0] not in ("logprobs", "rollout", "gpu"):
                parser.parse_args(argv[:2])  # prints the usage error for a bad benchmark name
            args.which, args.args = own[0], own[1:]
    else:
        args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the training log
    if args.command == "synth":
        from grpo_speech.data.synth import synthesize
        synthesize(args.task, args.out, args.n_train, args.n_val, args.n_test, args.seed,
                   domain=args.domain)
    elif args.command == "pretrain":
        from grpo_speech import pretrain
        pretrain.main(args.args)
    elif args.command == "train":
        from grpo_speech.train import train
        train(_load(args))
    elif args.command == "eval":
        from grpo_speech import evaluate
        evaluate.main(_load(args))
    elif args.command == "score":
        from grpo_speech.metrics import score_files
        score_files(args.hyp, args.ref, args.lang)
    elif args.command == "bench":
        if args.which == "logprobs":
            from grpo_speech import bench_logprobs as bench
        elif args.which == "gpu":
            from grpo_speech import bench_gpu as bench
        else:
            from grpo_speech import bench_rollout as bench
        bench.main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
