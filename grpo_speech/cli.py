"""Command line: `python -m grpo_speech <command>` (also installed as `grpo-speech`).

    python -m grpo_speech synth --task ast --out data/synthetic/ast
    python -m grpo_speech pretrain pretrain.steps=50 pretrain.out=/tmp/base    # the tiny base's recipe
    python -m grpo_speech train --config experiments/tiny/ast_grpo.yaml train.max_steps=10
    torchrun --nproc_per_node=4 -m grpo_speech train --config experiments/granite-speech-2b/ast_grpo.yaml
    python -m grpo_speech score --hyp hyp.txt --ref ref.txt --lang de
    python -m grpo_speech prepare covost2 --cv-dir CV4/en --covost-tsv covost_v2.en_de.tsv --out data/covost2
    python -m grpo_speech prepare librisqa --librisqa-dir LibriSQA --librispeech-dir . --out data/librisqa
    python -m grpo_speech check --config experiments/granite-speech-2b/ast_grpo.yaml
    python -m grpo_speech export runs/ast_grpo/best merged/      # a LoRA run's best/ as a full model

Outside the project's venv, run these as `.venv/bin/python -m grpo_speech ...` with
NLTK_DATA=.venv/nltk_data (what `make` sets). A mistake in the user's input (config, data, paths)
prints one line and exits 2, so a traceback always means a bug.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser, resume: bool) -> None:
    p.add_argument("--config", help="YAML file of config overrides (see grpo_speech/config.py)")
    if resume:
        p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR with the config saved there; `--resume auto` "
                            "(with --config) resumes run.dir when it holds checkpoints, else starts fresh")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. grpo.beta=0.04")


def _load(args):
    from grpo_speech.config import UserError, load_config
    overrides = list(args.overrides)
    resume = getattr(args, "resume", None)
    if resume == "auto":
        overrides.append("run.resume=auto")
    elif resume:
        # A mistyped RUN_DIR must not start a fresh run with the defaults.
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {resume}: no {saved} (not a run directory; "
                            "a run writes config.yaml when it starts)")
        overrides += ["resume=true", f"run.dir={resume}"]
        if not args.config:
            args.config = str(saved)
    cfg = load_config(args.config, overrides)
    _check_model_path(cfg.model.path)
    return cfg


def _check_model_path(path: str) -> None:
    """A model.path that is neither a directory nor a hub id the loader can reach is named here,
    before the hub client reports it as a missing repository."""
    from grpo_speech.config import UserError
    if not path or Path(path).is_dir():
        return
    if Path(path).exists():
        raise UserError(f"model.path {path!r} is a file, not a model directory")
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    reachable = hub_id and not offline and _hub_reachable()
    if reachable:
        return
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            if not offline:  # the hub is unreachable: load from the cache without minutes of retries
                print(f"note: the hub is unreachable; loading {path} from the local cache", file=sys.stderr)
                os.environ["HF_HUB_OFFLINE"] = "1"
                constants.HF_HUB_OFFLINE = True
            return
    why = ""
    if hub_id:
        why = (" (nor in the local hub cache; HF_HUB_OFFLINE is set)" if offline
               else " (nor in the local hub cache, and the hub is unreachable)")
    raise UserError(f"model.path {path!r}: directory not found{why}")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One quick connection to the hub's host (HF_ENDPOINT honoured): no retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _check(cfg) -> None:
    """`check`: every split's table and prompt lengths, then one step of cfg.method (a forward of
    the policy and reference, and an optimiser step) on two train examples with cfg's model and
    device, in a scratch run directory. It is what to run before booking GPUs."""
    import json
    import tempfile

    from grpo_speech.config import replace
    from grpo_speech.data.prepare import check_data
    from grpo_speech.train import train
    check_data(cfg)
    with tempfile.TemporaryDirectory(prefix="grpo-speech-check-") as scratch:
        one = replace(cfg, **{"resume": False, "run.dir": scratch, "run.overwrite": True,
                              "run.evaluate": False, "run.tensorboard": False, "run.wandb": False,
                              "train.max_steps": 1, "train.prompts_per_step": 2,
                              "train.save_every": 1, "train.eval_every": 1})
        train(one)
        step = json.loads((Path(scratch) / "metrics.jsonl").read_text().splitlines()[-1])
    shown = {k: round(v, 4) for k, v in step.items()
             if k in ("loss/total", "reward/mean", "optim/grad_norm", "time/rollout", "time/train")}
    print(f"check: one {cfg.method} step on 2 examples ran: {shown}")


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
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="[--config FILE] key=value ...: the config's pretrain section (pretrain.steps=50)")

    p = sub.add_parser("train", help="SFT, GRPO or MP-GRPO training (method=...)")
    _config_args(p, resume=True)

    p = sub.add_parser("eval", help="score a model on the test split with all six metrics")
    _config_args(p, resume=False)

    p = sub.add_parser("score", help="score a hypothesis file against a reference file")
    p.add_argument("--hyp", required=True, help="hypotheses, one sentence a line")
    p.add_argument("--ref", required=True, help="references, one sentence a line")
    # Recorded with the scores; no metric depends on it (METEOR uses English WordNet whatever
    # the language, as nltk does: metrics.py).
    p.add_argument("--lang", default="en", choices=("en", "de"),
                   help="language of the texts, recorded only: the scores are the same for both")
    p.add_argument("--metrics", default="bleu,bertscore,rouge1,rouge2,rougeL,meteor",
                   help="comma list of the metrics to compute (BERTScore is the slow one)")

    p = sub.add_parser("prepare", help="a real dataset's splits as manifests (README, Data)")
    which = p.add_subparsers(dest="dataset", metavar="dataset", required=True)
    q = which.add_parser("covost2", help="Common Voice v4 + the CoVoST 2 translation table")
    q.add_argument("--cv-dir", required=True,
                   help="Common Voice v4 English folder (validated.tsv and clips/)")
    q.add_argument("--covost-tsv", required=True, help="the translation table, covost_v2.en_de.tsv")
    q.add_argument("--out", required=True,
                   help="folder for the split TSVs and manifests (then data.dir)")
    q.add_argument("--task", choices=("ast", "asr"), default="ast")
    _config_args(q, resume=False)
    q = which.add_parser("librisqa", help="LibriSQA Part I + LibriSpeech")
    q.add_argument("--librisqa-dir", required=True,
                   help="the LibriSQA release (holding LibriSQA-PartI/) or its LibriSQA-PartI/")
    q.add_argument("--librispeech-dir", required=True,
                   help="the folder holding LibriSpeech/ (train-clean-360, test-clean)")
    q.add_argument("--out", required=True, help="folder for the manifests (then data.dir)")
    q.add_argument("--task", choices=("sqa", "asr"), default="sqa")
    _config_args(q, resume=False)

    p = sub.add_parser("check", help="before booking GPUs: the data tables and prompt lengths, then "
                                     "one training step of the configured model on two examples")
    _config_args(p, resume=False)

    p = sub.add_parser("export", help="write a full model directory from a run's best/ (LoRA merged)")
    p.add_argument("src", help="a run's best/ (a peft adapter directory over its base, or a whole model)")
    p.add_argument("out", help="output directory (replaced atomically)")

    p = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    p.add_argument("which", choices=("logprobs", "rollout", "prefix", "gpu", "checkpoint"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark (--help lists them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from grpo_speech.config import UserError
    try:
        return _main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}" if e.filename else f"error: {e}",
              file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: no space left on the device{where}: free some space (or move run.dir) and "
              "resume; the newest complete checkpoint is intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # pretrain and bench hand their options, in order, on to their own parsers (argparse would
    # split "--steps 50" between its known and unknown lists).
    if argv and argv[0] in ("pretrain", "bench"):
        own = [a for a in argv[1:] if a != "--"]
        args = argparse.Namespace(command=argv[0], args=own)
        if argv[0] == "bench":
            if not own or own[0] not in ("logprobs", "rollout", "gpu", "checkpoint"):
                parser.parse_args(argv[:2])  # bench's help (exit 0) or its usage error (exit 2)
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
        from grpo_speech.recipes import pretrain
        pretrain.main(args.args)
    elif args.command == "train":
        from grpo_speech.train import train
        train(_load(args))
    elif args.command == "eval":
        from grpo_speech import evaluate
        evaluate.main(_load(args))
    elif args.command == "score":
        from grpo_speech.metrics import score_files
        score_files(args.hyp, args.ref, args.lang, tuple(m.strip() for m in args.metrics.split(",") if m.strip()))
    elif args.command == "prepare":
        from grpo_speech.data import prepare
        args.overrides = [f"task={args.task}"] + list(args.overrides)
        cfg = _load(args)
        if args.dataset == "covost2":
            prepare.prepare_covost2(cfg, Path(args.cv_dir), Path(args.covost_tsv), Path(args.out))
        else:
            prepare.prepare_librisqa(cfg, Path(args.librisqa_dir), Path(args.librispeech_dir),
                                     Path(args.out))
    elif args.command == "check":
        _check(_load(args))
    elif args.command == "export":
        from grpo_speech.model import export_merged
        _check_model_path(args.src)
        print(f"wrote {export_merged(args.src, args.out)}")
    elif args.command == "bench":
        if args.which == "logprobs":
            from grpo_speech.bench import logprobs as bench
        elif args.which == "gpu":
            from grpo_speech.bench import gpu as bench
        elif args.which == "checkpoint":
            from grpo_speech.bench import checkpoint as bench
        elif args.which == "prefix":
            from grpo_speech.bench import prefix as bench
        else:
            from grpo_speech.bench import rollout as bench
        bench.main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
