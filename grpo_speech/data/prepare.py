"""`prepare`: a real dataset from its release files to one manifest per split (manifest.py), with a
table of what each split holds and what the length limits would leave out of training.

    python -m grpo_speech prepare covost2 --cv-dir cv-corpus-4/en --covost-tsv covost_v2.en_de.tsv \
        --out data/covost2
    python -m grpo_speech prepare librisqa --librisqa-dir LibriSQA --librispeech-dir . --out data/librisqa

CoVoST 2 first joins Common Voice v4's validated.tsv with the translation table, as
facebookresearch/covost `get_covost_splits.py --version 2` does, and writes the same split TSVs.
"""
from __future__ import annotations

import re
from pathlib import Path

from grpo_speech.config import Config, replace
from grpo_speech.data.rows import DataError, Split

SPLITS = ("train", "validation", "test")


def join_covost(cv_tsv: Path, covost_tsv: Path, out: Path) -> dict[str, Path]:
    """get_covost_splits.py for CoVoST 2: the inner join of validated.tsv (path, sentence,
    client_id) and covost_v2.<pair>.tsv (path, translation, split) on path, in validated.tsv's row
    order (each of its rows followed by its matches in the table's order, as pandas.merge gives),
    written as covost_v2.<pair>.{train,dev,test}.tsv (train: split train or train_covost). Both
    are read, and the splits written, with the release's escaping. {split name: file}."""
    from grpo_speech.data.covost import PAIR, read_tsv, write_tsv

    m = re.fullmatch(rf"(covost_v2)\.({PAIR})\.tsv", covost_tsv.name)
    if m is None:
        raise DataError(f"{covost_tsv}: expected the CoVoST 2 translation table "
                        f"covost_v2.<src>_<tgt>.tsv (e.g. covost_v2.en_de.tsv)")
    prefix = f"{m.group(1)}.{m.group(2)}"
    table: dict[str, list[tuple[str, str]]] = {}
    for path in (covost_tsv, cv_tsv):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    header, rows = read_tsv(covost_tsv)
    _need(covost_tsv, header, ("path", "translation", "split"))
    col = {k: header.index(k) for k in ("path", "translation", "split")}
    for line_no, cells in rows:
        cells = _fields(covost_tsv, line_no, cells, header)
        table.setdefault(cells[col["path"]], []).append((cells[col["translation"]], cells[col["split"]]))
    out.mkdir(parents=True, exist_ok=True)
    # train: "train" and "train_covost" (CoVoST 2's extra train rows); dev and test as they are.
    split_of = {"train": "train", "train_covost": "train", "dev": "dev", "test": "test"}
    joined: dict[str, list[list[str]]] = {"train": [], "dev": [], "test": []}
    header, rows = read_tsv(cv_tsv)
    _need(cv_tsv, header, ("path", "sentence", "client_id"))
    col = {k: header.index(k) for k in ("path", "sentence", "client_id")}
    for line_no, cells in rows:
        cells = _fields(cv_tsv, line_no, cells, header)
        for translation, split in table.get(cells[col["path"]], ()):
            if split in split_of:
                joined[split_of[split]].append([cells[col["path"]], cells[col["sentence"]],
                                                translation, cells[col["client_id"]]])
    files = {}
    for split, split_rows in joined.items():
        files[split] = out / f"{prefix}.{split}.tsv"
        write_tsv(files[split], ["path", "sentence", "translation", "client_id"], split_rows)
    return files


def _need(path: Path, header: list[str] | None, keys: tuple[str, ...]) -> None:
    if header is None or any(k not in header for k in keys):
        raise DataError(f"{path}: header must name {keys}, got {header}")


def _fields(path: Path, line_no: int, cells: list[str], header: list[str]) -> list[str]:
    """A row padded to the header's width, as pandas reads a short row; a long row is an error,
    as it is for pandas."""
    if len(cells) > len(header):
        raise DataError(f"{path} line {line_no}: {len(cells)} tab-separated fields, the header "
                        f"has {len(header)}")
    return cells + [""] * (len(header) - len(cells))


def prompt_measure(cfg: Config):
    """(tokenizer, projector) of cfg.model's processor and config (no weights are loaded), or
    None when there is no model to measure prompts for (the tiny base not built yet)."""
    from transformers import AutoConfig, GraniteSpeechProcessor

    from grpo_speech.model import default_base_path
    path = cfg.model.path or str(default_base_path())
    if not cfg.model.path and not Path(path).exists():
        return None
    processor = GraniteSpeechProcessor.from_pretrained(path)
    model_config = AutoConfig.from_pretrained(path)
    return processor.tokenizer, (model_config.window_size, model_config.downsample_rate)


def table(name: str, split: Split, cfg: Config, lengths: list[int] | None) -> str:
    """One split's lines: rows, hours, rows skipped by reason, rows over each length limit."""
    seconds = [e["seconds"] for e in split.examples]
    lines = [f"{name}: {len(seconds):,} rows, {sum(seconds) / 3600:.2f} hours"
             + (f", longest {max(seconds):.1f} s" if seconds else "")]
    for reason, n in sorted(split.skipped.items()):
        lines.append(f"  skipped ({reason}): {n:,}")
    over = sum(s > cfg.data.max_audio_seconds for s in seconds)
    note = "left out of training" if name.endswith("train") else "kept: limits cut train only"
    lines.append(f"  over data.max_audio_seconds={cfg.data.max_audio_seconds:g}: {over:,} ({note})")
    if lengths is not None:
        over = sum(n > cfg.data.max_prompt_tokens for n in lengths)
        lines.append(f"  over data.max_prompt_tokens={cfg.data.max_prompt_tokens}: {over:,} ({note}); "
                     f"longest prompt {max(lengths, default=0)} tokens")
    else:
        lines.append("  prompt tokens: not counted (no model: set model.path or build the tiny base)")
    return "\n".join(lines)


def write_manifests(cfg: Config, out: Path, meta: dict) -> dict[str, Split]:
    """Build every split of cfg's real dataset (data.dir), count its prompt tokens for cfg.model
    when there is one, write out/manifest.<task>.<split>.jsonl and print its table."""
    from grpo_speech.data import build_split
    from grpo_speech.data.collate import prompt_lengths, prompt_tokens_key
    from grpo_speech.data.manifest import manifest_name, write_manifest
    from grpo_speech.data.prompts import run_prompts

    measure = prompt_measure(cfg)
    root = Path(cfg.data.dir).resolve()
    splits = {}
    for split in SPLITS:
        splits[split] = whole = build_split(cfg, root, split)
        lengths, key = None, None
        if measure is not None:
            # The run's own wordings and system turn (data.instructions, data.system_prompt), as
            # training measures them: its stored lengths are then used as they are.
            tokenizer, projector = measure
            prompts = run_prompts(cfg, tokenizer)
            templates = list(prompts.templates)
            lengths = prompt_lengths(whole.examples, templates, tokenizer, prompts.system, projector)
            key = prompt_tokens_key(tokenizer, templates, prompts.system, projector)
        path = out / manifest_name(cfg.task, split)
        write_manifest(path, whole, {**meta, "task": cfg.task, "split": split,
                                     "prompt_tokens_key": key}, lengths)
        print(table(f"{cfg.data.source} {cfg.task} {split}", whole, cfg, lengths))
        print(f"  -> {path}")
    return splits


def prepare_covost2(cfg: Config, cv_dir: Path, covost_tsv: Path, out: Path) -> dict[str, Split]:
    files = join_covost(cv_dir / "validated.tsv", covost_tsv, out)
    for split, path in files.items():
        print(f"{path}: written")
    pair = covost_tsv.name.split(".")[1]
    cfg = replace(cfg, **{"data.source": "covost2", "data.dir": str(out),
                          "data.audio_root": str(cv_dir.resolve() / "clips"), "data.covost_pair": pair})
    return write_manifests(cfg, out, {"source": "covost2", "covost_pair": pair})


def prepare_librisqa(cfg: Config, librisqa_dir: Path, librispeech_dir: Path, out: Path
                     ) -> dict[str, Split]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, **{"data.source": "librisqa", "data.dir": str(librisqa_dir),
                          "data.audio_root": str(librispeech_dir.resolve())})
    return write_manifests(cfg, out, {"source": "librisqa"})


def check_data(cfg: Config) -> None:
    """`check`'s data part: each split as a run of cfg reads it (its manifest, length limits on
    train only), as a table, with the prompt lengths for cfg.model."""
    from grpo_speech.data import load_split
    from grpo_speech.data.collate import prompt_lengths
    from grpo_speech.data.prompts import run_prompts

    measure = prompt_measure(cfg)
    for split in SPLITS:
        examples = load_split(cfg, split)
        lengths = None
        if measure is not None:
            tokenizer, projector = measure
            prompts = run_prompts(cfg, tokenizer)
            lengths = prompt_lengths(examples.examples, list(prompts.templates), tokenizer,
                                     prompts.system, projector)
        print(table(f"{cfg.data.source} {cfg.task} {split}", examples, cfg, lengths))
        if lengths:
            ranked = sorted(lengths)
            print(f"  prompt tokens: median {ranked[len(ranked) // 2]}, p95 "
                  f"{ranked[min(len(ranked) - 1, int(0.95 * len(ranked)))]}, max {ranked[-1]}")
