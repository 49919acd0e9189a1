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
    p.add_argument("which", choices=("logprobs", "rollout"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # pretrain and bench hand their options on to their own parsers.
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("pretrain", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("pretrain", "bench"):
        args.args = [a for a in args.args if a != "--"] + rest
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
        else:
            from grpo_speech import bench_rollout as bench
        bench.main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
