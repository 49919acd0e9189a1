"""Typed config: YAML + key=value overrides, type checks, unknown keys; ranges and choices,
duplicate YAML keys.

    .venv/bin/python -m pytest -q tests/test_config.py
"""
import dataclasses
from pathlib import Path

import pytest

from grpo_speech.config import Config, ConfigError, load_config, replace, save_config


def test_defaults_are_frozen():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo.beta = 1.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: mpgrpo\ngrpo:\n  beta: 0.04\n  reward: {bleu: 0.7, rougeL: 0.3}\n")
    cfg = load_config(path, ["grpo.beta=0.1", "train.max_steps=7", "train.lr=1e-5", "resume=true"])
    assert cfg.method == "mpgrpo"
    assert cfg.grpo.beta == 0.1  # the command line wins over the file
    assert cfg.grpo.reward == "bleu:0.7,rougeL:0.3"
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-5 and cfg.resume is True
    assert cfg.grpo.group_size == 8  # untouched default (paper: G = 8)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo.betta'.*'grpo.beta'"):
        load_config(None, ["grpo.betta=0.1"])
    with pytest.raises(ConfigError, match=r"'trian'"):
        load_config(None, ["trian.lr=0.1"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps' = 'ten'.*expected int"):
        load_config(None, ["train.max_steps=ten"])
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  group_size: 2.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'grpo.group_size' = 2.5.*expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'method' = 'ppo'.*one of"):
        load_config(None, ["method=ppo"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["grpo.beta"])


def test_save_and_reload_is_identical(tmp_path):
    cfg = load_config(None, ["grpo.beta=0.05", "run.dir=somewhere"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert replace(cfg, **{"train.lr": 0.5}).train.lr == 0.5 and cfg.train.lr != 0.5


# Each value below was once accepted; group_size=1 trained on zero advantages and exited 0.
@pytest.mark.parametrize("override, allowed", [
    ("grpo.group_size=1", "an integer >= 2 for method=grpo"),
    ("train.max_steps=0", "an integer >= 1"),
    ("train.micro_batch_size=0", "an integer >= 1"),
    ("train.micro_batch_size=-3", "an integer >= 1"),
    ("train.lr=nan", "a finite number > 0"),
    ("train.lr=-1", "a finite number > 0"),
    ("train.lr=inf", "a finite number > 0"),
    ("grpo.eps_low=2", "0 <= value < 1"),
    ("grpo.top_p=0", "0 < value <= 1"),
    ("train.eval_every=0", "an integer >= 1"),
    ("train.save_every=0", "an integer >= 1"),
    ("train.prompts_per_step=0", "an integer >= 1"),
    ("grpo.reward=blue", "unknown reward 'blue'"),
    ("eval.metric=bleuu", "one of ('bleu', 'bertscore', 'rouge1', 'rouge2', 'rougeL', 'meteor')"),
    ("model.train=foo", "a comma list of ('lora', 'projector', 'llm', 'encoder')"),
    ("grpo.loss_type=ppo", "one of ('dapo', 'grpo', 'bnpo', 'dr_grpo', 'cispo')"),
    ("grpo.scale_rewards=std", "one of ('group', 'batch', 'none')"),
    ("grpo.importance_sampling=seq", "one of ('token', 'sequence')"),
    ("grpo.delta=1.1", "0 (off) or a finite number > 1 + eps_high = 1.2"),
    ("grpo.delta=-1", "0 (off) or a finite number > 1 + eps_high"),
    ("grpo.delta=inf", "0 (off) or a finite number > 1 + eps_high"),
])
def test_validate_names_key_value_and_what_is_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"config key '{key}' = ") and allowed in msg
    assert value.lstrip("-") in msg  # the value as given (nan, inf, 2.0, 'blue', ...)


def test_validate_ranges_that_depend_on_the_method_and_all_errors_at_once():
    # SFT samples nothing: its group size is unused.
    assert load_config(None, ["method=sft", "grpo.group_size=1"]).method == "sft"
    with pytest.raises(ConfigError, match=r"'grpo.group_size' = 1: .*mpgrpo"):
        load_config(None, ["method=mpgrpo", "grpo.group_size=1"])
    with pytest.raises(ConfigError, match=r"'eval.top_p' = 1.5: .*; config key 'train.lr' = -1.0: "):
        load_config(None, ["train.lr=-1", "eval.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"'train.lr'"):  # replace() validates too
        replace(load_config(), **{"train.lr": 0.0})
    # Every shipped experiment passes.
    for path in sorted(Path(__file__).resolve().parents[1].glob("experiments/*/*.yaml")):
        load_config(path)


def test_loss_variants_and_the_combination_that_is_refused():
    cfg = load_config(None, ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=none", "grpo.delta=2"])
    assert (cfg.grpo.loss_type, cfg.grpo.scale_rewards, cfg.grpo.delta) == ("dr_grpo", "none", 2.0)
    defaults = load_config().grpo  # the paper's loss
    assert (defaults.loss_type, defaults.scale_rewards, defaults.importance_sampling, defaults.delta) == (
        "dapo", "group", "token", 0.0)
    # delta is checked against the eps_high it is given with: 1.5 > 1.2, not > 1.28 + 0.3.
    with pytest.raises(ConfigError, match=r"'grpo.delta' = 1.5: expected 0 \(off\) or a finite number > 1 \+ eps_high = 1.58"):
        load_config(None, ["grpo.delta=1.5", "grpo.eps_high=0.58"])
    # GSPO's sequence ratio with MP-GRPO's reference rows: refused in one line; fine for GRPO.
    assert load_config(None, ["grpo.importance_sampling=sequence"]).grpo.importance_sampling == "sequence"
    with pytest.raises(ConfigError, match=r"^config key 'grpo.importance_sampling' = 'sequence': expected token "
                                          r"with method=mpgrpo \(.*\)$"):
        load_config(None, ["method=mpgrpo", "grpo.importance_sampling=sequence"])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "cispo"):  # every aggregation works with MP-GRPO
        assert load_config(None, ["method=mpgrpo", f"grpo.loss_type={loss_type}"]).grpo.loss_type == loss_type


def test_yaml_duplicate_key_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("grpo:\n  beta: 0.1\ntrain:\n  lr: 1.0e-3\ngrpo:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml line 5: .*duplicate key 'grpo' \(first at line 1\)"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"line 3: .*duplicate key 'lr'"):
        load_config(path)


def test_logprob_chunk_size_has_one_default():
    # The trainer's key and the library function share one value: logprobs.DEFAULT_CHUNK_SIZE.
    import inspect

    from grpo_speech.config import ModelConfig
    from grpo_speech.logprobs import DEFAULT_CHUNK_SIZE
    from grpo_speech.rollout import sequence_logprobs

    assert ModelConfig().logprob_chunk_size == DEFAULT_CHUNK_SIZE
    assert inspect.signature(sequence_logprobs).parameters["chunk_size"].default == DEFAULT_CHUNK_SIZE


def test_greedy_grpo_is_refused():
    # At temperature 0 the G samples are one completion: every advantage is 0 (as with G = 1).
    with pytest.raises(ConfigError, match="grpo.temperature"):
        load_config(None, ["method=grpo", "grpo.temperature=0"])
    load_config(None, ["method=mpgrpo", "grpo.temperature=0"])  # the reference row still differs
    load_config(None, ["method=sft", "grpo.temperature=0"])
