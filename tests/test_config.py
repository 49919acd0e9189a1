"""Typed config: YAML + key=value overrides, type checks, unknown keys.

    .venv/bin/python -m pytest -q tests/test_config.py
"""
import dataclasses

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
