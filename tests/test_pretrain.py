"""Pretraining recipe of the tiny base: a few steps on a tiny synthetic set, save, reload.

    .venv/bin/python -m pytest -q tests/test_pretrain.py
"""
import json
import math

import pytest

from grpo_speech.recipes import pretrain
from grpo_speech.config import ModelConfig
from grpo_speech.model import load_model
from grpo_speech.train import lr_lambda


def test_ctc_targets_by_hand():
    # CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'" with blank 0: space 1, a 2, ..., z 27, ' 28.
    # "Hi, Tom's!" -> "hi tom's": h 9, i 10, space 1, t 21, o 16, m 14, ' 28, s 20.
    assert pretrain.ctc_targets("Hi,  Tom's!") == [9, 10, 1, 21, 16, 14, 28, 20]


def test_encoder_frames_by_hand():
    # 1 s = 16000 samples -> 16000 // 160 + 1 = 101 mel frames -> 101 // 2 = 50 encoder frames.
    assert pretrain.encoder_frames(1.0) == 50
    # 2.5 s -> 40000 // 160 + 1 = 251 -> 125.
    assert pretrain.encoder_frames(2.5) == 125


def test_word_errors_by_hand():
    assert pretrain.word_errors("The cat sat.", "the cat sat") == 0
    assert pretrain.word_errors("the cat", "the cat sat") == 1  # one deletion
    assert pretrain.word_errors("a dog sat down", "the cat sat") == 3  # 2 substitutions + 1 insertion


def test_instruction_phase_wordings():
    from grpo_speech.data.prompts import TEMPLATES
    for task, target in TEMPLATES["target"].items():
        core, wide = TEMPLATES["pretrain"][task], TEMPLATES["pretrain-wide"][task]
        # The first phase's two wordings, then only new ones; never a target wording.
        assert wide[:len(core)] == core and len(set(wide)) == len(wide) >= 8
        assert not set(wide) & set(target)
    # The committed recipe (pretrain.instruct_share=0) never leaves the two wordings.
    args = pretrain.parse_args([]).pretrain
    assert {pretrain.prompt_domain(s, args) for s in range(args.steps)} == {"pretrain"}
    args = pretrain.parse_args(["pretrain.steps=10", "pretrain.instruct_share=0.2"]).pretrain
    assert [pretrain.prompt_domain(s, args) for s in range(10)] == ["pretrain"] * 8 + ["pretrain-wide"] * 2


def test_recipe_reads_the_typed_config_as_the_trainer_does(tmp_path):
    # A YAML file's pretrain section, then key=value overrides (the later wins); unknown keys and
    # bad values are errors; the defaults are the committed recipe (its pretrain.json options).
    (tmp_path / "p.yaml").write_text("pretrain:\n  steps: 10\n  lr: 1.0e-3\n")
    p = pretrain.parse_args(["--config", str(tmp_path / "p.yaml"), "pretrain.steps=20"]).pretrain
    assert (p.steps, p.lr, p.batch_size) == (20, 1e-3, 8)
    for bad in ("pretrain.stepz=5", "pretrain.steps=0", "pretrain.lr=fast"):
        with pytest.raises(SystemExit):
            pretrain.parse_args([bad])
    committed = json.loads((pretrain.DEFAULT_OUT / "pretrain.json").read_text())["options"]
    defaults = pretrain.claim_work_dir(tmp_path / "work", pretrain.parse_args([]).pretrain)
    assert {k: v for k, v in defaults.items() if k in committed and k != "out"} == \
        {k: v for k, v in committed.items() if k != "out"}


def _clips(task, n, seconds=1.0):
    return [{"id": f"{task}-{i}", "task": task, "seconds": seconds + i / 100, "prompt_fields": {},
             "reference": f"{task} {i}", "transcript": f"{task} {i}"} for i in range(n)]


def test_instruct_mix_sets_the_last_phase_tasks_and_leaves_the_rest():
    train = {"asr": _clips("asr", 40), "words": _clips("words", 40), "ast": _clips("ast", 40),
             "sqa": _clips("sqa", 40)}
    base = ["pretrain.steps=400", "pretrain.batch_size=4", "pretrain.words_steps=0.05", "pretrain.instruct_share=0.5"]
    plain = list(pretrain.batch_schedule(train, pretrain.parse_args(base).pretrain))
    mixed = list(pretrain.batch_schedule(
        train, pretrain.parse_args(base + ["pretrain.instruct_mix=ast=3,asr=1"]).pretrain))
    ids = lambda sched: [[ex["id"] for ex in b] for _, b in sched]
    assert [s for s, _ in mixed] == list(range(400))
    # The phases before the last one are the same batches with or without a mix.
    assert ids(mixed[:200]) == ids(plain[:200])
    tasks = [b[0]["task"] for _, b in mixed[200:]]
    # ast=3,asr=1: about three quarters ast (binomial sd of 200 draws at 0.75: 6 steps), no sqa;
    # without a mix, 40 asr + 40 word clips + half the ast and sqa clips make ASR about 3/4.
    assert 150 - 25 < tasks.count("ast") < 150 + 25 and "sqa" not in tasks
    assert [b[0]["task"] for _, b in plain[200:]].count("ast") < 60
    # ast clips all serve ast in the mixed phase, each once per pass over the task's clips.
    ast_ids = [ex["id"] for _, b in mixed[200:] for ex in b if b[0]["task"] == "ast"][:40]
    assert sorted(ast_ids) == sorted(ex["id"] for ex in train["ast"])
    # One batch is one task, and ASR batches read asr clips and word lists only.
    assert all(ex["task"] == "asr" and ex["id"].split("-")[0] in ("asr", "words")
               for _, b in mixed[200:] if b[0]["task"] == "asr" for ex in b)
    for bad in ("ast", "ast=x", "mt=1", "ast=-1,asr=2"):
        with pytest.raises(SystemExit):
            pretrain.parse_args(["pretrain.instruct_share=0.2", f"pretrain.instruct_mix={bad}"])
    with pytest.raises(SystemExit):  # a mix without a last phase would be silently unused
        pretrain.parse_args(["pretrain.instruct_mix=ast=1"])


def test_lr_schedule_by_hand():
    # 100 steps, warm-up 0.1 -> 10 warm-up steps: step 0 -> 1/10, step 9 -> 1.0;
    # the cosine reaches 0.1 + 0.9 * 0.5 * (1 + cos(pi * 45 / 90)) = 0.55 half-way through the rest.
    assert math.isclose(lr_lambda(0, 100, 0.1), 0.1)
    assert math.isclose(lr_lambda(9, 100, 0.1), 1.0)
    assert math.isclose(lr_lambda(55, 100, 0.1), 0.55)


def test_tiny_pretraining_run_learns_saves_and_reloads(tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    argv = [f"pretrain.work_dir={work}", f"pretrain.out={out}", "pretrain.n_train=16", "pretrain.n_val=0",
            "pretrain.n_test=4", "pretrain.steps=12", "pretrain.batch_size=4", "pretrain.asr_share=0",
            "pretrain.words_steps=0", "pretrain.save_every=6", "pretrain.eval_n=0", "pretrain.vocab_size=300",
            "pretrain.lm_hidden=64", "pretrain.text_batch=2", "pretrain.n_text=100", "pretrain.instruct_share=0.25",
            "pretrain.instruct_mix=asr=1,ast=2,sqa=1"]
    report = pretrain.main(argv)
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    rows = [r for r in records if "loss/ce" in r]
    probes = [r for r in records if "probe/ce_right" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # The last quarter of the steps (10-12) draws prompts from every pretrain wording.
    assert [r["prompts"] for r in rows] == ["pretrain"] * 9 + ["pretrain-wide"] * 3
    # The audio-reading probe runs at every checkpoint step; cross-entropies are finite nats.
    assert [r["step"] for r in probes] == [6, 12]
    assert all(0 < r["probe/ce_right"] < 10 and -1 <= r["probe/audio_cosine"] <= 1 for r in probes)
    # At initialisation the answer distribution is close to uniform over the vocabulary:
    # cross-entropy about ln(300) = 5.70. Twelve steps (projector and LM at lr 3e-3) must lower it
    # by more than 0.5 nats (the unigram distribution of the answers alone is worth more than that).
    first, last = rows[0]["loss/ce"], sum(r["loss/ce"] for r in rows[-3:]) / 3
    assert abs(first - math.log(300)) < 1.0, first
    assert last < first - 0.5, (first, last)
    assert all(math.isfinite(r["loss/ctc"]) for r in rows)

    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["command"].endswith(" ".join(argv)) and saved["options"]["steps"] == 12
    assert saved["parameters"] == report["parameters"]
    model, processor = load_model(ModelConfig(path=str(out), train="projector,llm"))
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert model.config.encoder_config.output_dim == len(pretrain.CTC_CHARS) + 1
    assert processor.tokenizer.convert_tokens_to_ids("<|audio|>") == model.config.audio_token_id


class _Tok:
    """Word-level stand-in for the BPE tokenizer: the CTC code only needs ids and the eos id."""
    eos_token_id = 0
    vocab = {"a": 1, "b": 2, "c": 3}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_audio_token_ctc_reads_each_rows_audio_positions_by_hand():
    import torch

    # Two left-padded rows of 6 prompt positions; row 0 has audio at 1..4, row 1 at 3..4.
    audio_BP = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    big = 30.0
    logits_BPV = torch.zeros(2, 6, 4)
    # Row 0 spells "a b" as a, blank, b, b; row 1 spells "c" as blank, c. Other positions favour
    # token 3, which must not count (they are not audio positions).
    for p, v in zip([1, 2, 3, 4], [1, 0, 2, 2]):
        logits_BPV[0, p, v] = big
    for p, v in zip([3, 4], [0, 3]):
        logits_BPV[1, p, v] = big
    logits_BPV[0, [0, 5], 3] = big
    logits_BPV[1, [0, 1, 2, 5], 3] = big
    good = pretrain.audio_token_ctc(logits_BPV, audio_BP, ["a b", "c"], _Tok())
    assert good.item() < 1e-6
    # Swapping the transcripts makes both rows wrong: row 1 cannot even emit "a b".
    bad = pretrain.audio_token_ctc(logits_BPV, audio_BP, ["c", "a b"], _Tok())
    assert bad.item() > 10.0
    # Uniform logits: the CTC loss is -log(paths * (1/4)^frames) / target length; row 1 ("c" over
    # 2 frames: paths "cc", "c-", "-c" -> 3) gives (2 ln 4 - ln 3) / 1 nats.
    uniform = torch.zeros(1, 6, 4)
    one = pretrain.audio_token_ctc(uniform, audio_BP[1:], ["c"], _Tok())
    assert abs(one.item() - (2 * math.log(4) - math.log(3))) < 1e-5


def test_cli_hands_pretrain_options_on_in_order(monkeypatch):
    from grpo_speech import cli

    seen = {}
    monkeypatch.setattr(pretrain, "main", lambda argv: seen.setdefault("argv", argv))
    cli.main(["pretrain", "--config", "x.yaml", "pretrain.steps=50", "pretrain.out=/tmp/x"])
    assert seen["argv"] == ["--config", "x.yaml", "pretrain.steps=50", "pretrain.out=/tmp/x"]


def test_report_names_the_committed_base_relative_to_the_checkout():
    # pretrain.json is committed beside the base: no directory of the machine that made it.
    assert pretrain._shown_path(str(pretrain.DEFAULT_OUT)) == "grpo_speech/assets/tiny_base"
    assert pretrain._shown_path("/elsewhere/base") == "/elsewhere/base"
