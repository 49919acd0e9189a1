"""The experiment grid's aggregation: learning-rate choice on validation widened until interior,
mean ± std tables, paired bootstrap comparisons, validation curves.

    .venv/bin/python -m pytest -q tests/test_experiments.py
"""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import sacrebleu

from grpo_speech.metrics import COLUMNS, bleu_from_statistics, bleu_statistics, paired_bootstrap
from grpo_speech.recipes import experiments

ROOT = Path(__file__).resolve().parents[1]
REFS = ["der hund schläft im garten", "die katze trinkt milch", "ich sehe den roten ball",
        "wir gehen heute in die stadt", "das kind spielt im park", "er hat einen apfel gekauft"]
GOOD = list(REFS[:4]) + ["das kind spielt", "er hat einen apfel"]
BAD = ["der hund", "die katze", "ich sehe", "wir gehen", "das kind", "er hat"]


def scores(x: float) -> dict:
    return {key: x + i for i, (key, _) in enumerate(COLUMNS)}


def test_pick_lr_uses_validation_and_prefers_the_smaller_rate_on_ties():
    res = {1e-4: {"best_val_bleu": 5.0}, 3e-4: {"best_val_bleu": 7.0}, 1e-3: {"best_val_bleu": 7.0}}
    assert experiments.pick_lr(res) == 3e-4


def test_sweep_widens_past_an_edge_until_the_choice_is_interior():
    assert experiments.next_rate([1e-4, 2e-4, 5e-4], 5e-4) == 1e-3
    assert experiments.next_rate([1e-4, 2e-4, 5e-4], 1e-4) == 5e-5
    assert experiments.next_rate([1e-4, 2e-4, 5e-4], 2e-4) is None  # interior
    assert experiments.next_rate([2e-5, 5e-5], 2e-5) is None  # the ladder ends


def test_table_mean_and_sample_std_by_hand():
    # BLEU 1, 2, 6: mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7) = 2.65.
    summary = experiments.summarize({"GRPO": [scores(1), scores(2), scores(6)]})
    assert summary["GRPO"]["bleu"] == (3.0, 7 ** 0.5)
    text = experiments.table(summary, {"GRPO": 3})
    assert "| GRPO | 3 | 3.00 ± 2.65 | 4.00 ± 2.65 |" in text


def test_bleu_statistics_sum_to_corpus_bleu():
    stats = bleu_statistics(GOOD, REFS)
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(sacrebleu.corpus_bleu(GOOD, [REFS]).score)
    assert bleu_from_statistics(stats[[0, 0, 4]].sum(0)) == pytest.approx(
        sacrebleu.corpus_bleu([GOOD[0], GOOD[0], GOOD[4]], [[REFS[0], REFS[0], REFS[4]]]).score)


def test_paired_bootstrap():
    same = paired_bootstrap([GOOD], [GOOD], REFS, n=200)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0 and same["p_a_better"] == 0.0
    better = paired_bootstrap([GOOD, GOOD], [BAD, GOOD], REFS, n=200)
    # Seeds pooled: A's mean BLEU minus the mean of B's two seeds.
    want = sacrebleu.corpus_bleu(GOOD, [REFS]).score - (sacrebleu.corpus_bleu(BAD, [REFS]).score +
                                                        sacrebleu.corpus_bleu(GOOD, [REFS]).score) / 2
    assert better["diff"] == pytest.approx(want)
    assert 0 < better["lo"] <= better["diff"] <= better["hi"] and better["p_a_better"] == 1.0
    worse = paired_bootstrap([BAD], [GOOD], REFS, n=200)
    assert worse["hi"] < 0 and worse["p_a_better"] == 0.0


def test_equal_time_steps_come_from_every_seed_not_one_run():
    # The seed-0 SFT run shared the CPU (0.78 s/step, twice its real speed): one run's ratio
    # would give SFT 60 * 2.0 / 0.78 = 154 steps, the medians 60 * 2.0 / 0.40 = 300.
    grpo = [{"step_seconds": x} for x in (2.0, 2.1, 1.9)]
    sft = [{"step_seconds": x} for x in (0.78, 0.38, 0.40)]
    steps = experiments.equal_time_steps(60, grpo, sft)
    assert steps["equal time"] == 300 and steps["equal steps"] == 60
    assert (steps["grpo_seconds_per_step"], steps["sft_seconds_per_step"]) == (2.0, 0.40)
    # SFT never gets fewer steps than GRPO, even where its steps are the slower ones.
    assert experiments.equal_time_steps(60, sft, grpo)["equal time"] == 60


def fake_run(tmp_path, name: str, method: str, trained: float, hyps: list[str], val: float,
             step_seconds: float = 1.0) -> dict:
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / f"test_hyps_{method}.txt").write_text("".join(h + "\n" for h in hyps))
    (d / "test_references.jsonl").write_text("".join(json.dumps([r]) + "\n" for r in REFS))
    records = [{"step": 0, "val/bleu": 1.0}]
    records += [{"step": s, "time/step": step_seconds} for s in range(1, 5)]
    records += [{"step": 2, "val/bleu": val / 2}, {"step": 4, "val/bleu": val}]
    records.sort(key=lambda r: (r["step"], "val/bleu" in r))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curve, secs = experiments.read_curve(d / "metrics.jsonl")
    return {"best_val_bleu": val, "best_step": 4, "run": name, "dir": str(d), "wall_seconds": 60.0,
            "results": {"base": scores(1.0), method: scores(trained)}, "curve": curve,
            "step_seconds": secs}


def test_write_results_makes_every_table_and_the_plot(tmp_path):
    headline = {}
    for task in experiments.TASKS:
        headline[task] = {}
        for name, method, _, _ in experiments.ROWS:
            hyps = GOOD if name == "GRPO" else BAD
            headline[task][name] = [fake_run(tmp_path, f"{task}_{name}_{s}", method,
                                             2.0 + s + (name == "GRPO"), hyps, 3.0) for s in range(2)]
    assert headline["sqa"]["GRPO"][0]["curve"] == [(0, 0.0, 1.0), (2, 2.0, 1.5), (4, 4.0, 3.0)]
    assert headline["sqa"]["GRPO"][0]["step_seconds"] == 1.0
    ablation = {"bleu": headline["sqa"]["GRPO"]}
    for reward in experiments.ABLATION_REWARDS:
        ablation[reward] = [fake_run(tmp_path, f"r{reward}{s}", "grpo", 2.5, BAD, 3.0) for s in range(2)]
    sweep = {(t, m): {lr: fake_run(tmp_path, f"{t}{m}{lr}", m, 2.0, BAD, v)
                      for lr, v in ((1e-4, 3.0), (2e-4, 4.0), (5e-4, 3.5))}
             for t in experiments.TASKS for m in ("sft", "grpo")}
    chosen = {k: 2e-4 for k in sweep}
    steps = {t: {"equal steps": 4, "equal time": 9, "grpo_seconds_per_step": 2.25,
                 "sft_seconds_per_step": 1.0} for t in experiments.TASKS}
    data = experiments.write_results(tmp_path / "out", chosen, sweep, headline, ablation, steps)
    out = tmp_path / "out"
    for name in ("table1_sqa.md", "table2_ast.md", "table3_rewards.md", "sweep.md", "results.md",
                 "curves.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    # GRPO on seeds 0 and 1: BLEU 3 and 4 -> 3.50 ± 0.71; the base row comes from the GRPO runs.
    t1 = (out / "table1_sqa.md").read_text()
    assert "| GRPO | 2 | 3.50 ± 0.71 |" in t1 and "| SFT, equal time | 2 |" in t1
    assert "| Base | 2 | 1.00 ± 0.00 |" in (out / "table2_ast.md").read_text()
    assert "SFT at equal time: 9 (GRPO 2.25 s per step, SFT 1.00: medians over seeds)." in t1
    grpo_sft = data["comparisons"]["sqa"]["GRPO - SFT"]
    assert grpo_sft["diff"] > 0 and grpo_sft["lo"] > 0 and grpo_sft["p_a_better"] == 1.0
    assert "| GRPO - SFT | +" in t1
    t3 = (out / "table3_rewards.md").read_text()
    assert "| GRPO, METEOR reward | 2 | 2.50 ± 0.00 |" in t3 and "| BLEU reward - METEOR reward | +" in t3
    assert "| sqa | GRPO | 0.0002 | 4.00 | yes |" in (out / "sweep.md").read_text()
    # 10 headline rows x 2 seeds + 8 ablation (the BLEU row is the headline GRPO) + 12 sweep
    # runs, 1 min each; a run listed twice counts once.
    assert data["compute"].startswith("40 runs timed, 40.0 min")
    assert json.loads((out / "summary.json").read_text())["chosen_lr"]["ast/sft"] == 2e-4


def test_a_resumed_run_keeps_its_log_and_counts_the_time_before_the_kill(tmp_path, monkeypatch):
    # A real (tiny) SFT run, then the state a kill after step 1's checkpoint leaves: no step-2
    # checkpoint, no results.json, and 60 s of wall clock from its start to its log's last write.
    monkeypatch.chdir(ROOT)
    over = ["train.save_every=1", "train.eval_every=1", "train.prompts_per_step=2",
            "eval.max_val_examples=4", "eval.max_test_examples=4"]
    spec = ("sqa", "sft", 2e-4, 0, "bleu", 1, 2)
    first = experiments.run_one(tmp_path, spec, over)
    run_dir = Path(first["dir"])
    log = tmp_path / f"{run_dir.name}.log"
    first_log = log.read_text()
    shutil.rmtree(run_dir / "checkpoints" / "step_000002")
    (run_dir / "results.json").unlink()
    started = time.time() - 100
    (run_dir / "wall_seconds.json").write_text(json.dumps({"started": started}))
    os.utime(log, (started + 60, started + 60))

    t0 = time.time()
    second = experiments.run_one(tmp_path, spec, over)
    took = time.time() - t0
    text = log.read_text()
    assert text.startswith(first_log), "the killed part's log was overwritten"
    assert "--- resumed at" in text and "resumed from" in text.split("--- resumed at")[1]
    assert 60 + took - 2 <= second["wall_seconds"] <= 60 + took + 2
    assert json.loads((run_dir / "wall_seconds.json").read_text())["resumed"] is True


def test_loss_variant_rows_are_valid_configs_with_their_own_run_names(tmp_path):
    from grpo_speech.config import load_config

    names = {experiments.run_name("sqa", "grpo", 5e-4, 1, steps=100, variant=suffix)
             for _, suffix, _ in experiments.LOSS_VARIANTS}
    # The DAPO row is the headline GRPO run (same name, so a finished grid's run is reused).
    assert names == {"sqa_grpo_bleu_lr0.0005_s1_n100", "sqa_grpo_bleu_lr0.0005_s1_n100_drgrpo",
                     "sqa_grpo_bleu_lr0.0005_s1_n100_gspo"}
    configs = {name: load_config(ROOT / "experiments/tiny/sqa_grpo.yaml", list(over))
               for name, _, over in experiments.LOSS_VARIANTS}
    assert configs["DAPO (the paper's)"].grpo == load_config(ROOT / "experiments/tiny/sqa_grpo.yaml").grpo
    dr = configs["Dr. GRPO"].grpo
    assert (dr.loss_type, dr.scale_rewards) == ("dr_grpo", "none")
    gspo = configs["GSPO"].grpo
    assert (gspo.importance_sampling, gspo.loss_type, gspo.num_iterations, gspo.eps_low, gspo.eps_high) == (
        "sequence", "grpo", 2, 0.2, 0.2)
    with pytest.raises(SystemExit, match="needs --lr or a finished grid's"):
        experiments.main(["--loss-variants", "--out", str(tmp_path / "no_grid")])


def test_write_loss_variants_table_and_comparisons(tmp_path):
    rows = {}
    for i, (name, _, _) in enumerate(experiments.LOSS_VARIANTS):
        hyps = GOOD if i == 0 else BAD
        rows[name] = [fake_run(tmp_path, f"variant{i}_{s}", "grpo", 3.0 + s - i, hyps, 3.0) for s in range(3)]
    data = experiments.write_loss_variants(tmp_path / "out", rows, 5e-4, 100)
    text = (tmp_path / "out" / "table4_loss_variants.md").read_text()
    # DAPO over seeds: BLEU 3, 4, 5 -> 4.00 ± 1.00; GSPO (i = 2): 1, 2, 3 -> 2.00 ± 1.00.
    assert "| DAPO (the paper's) | 3 | 4.00 ± 1.00 |" in text and "| GSPO | 3 | 2.00 ± 1.00 |" in text
    assert "GRPO on sqa at lr 0.0005, 100 steps a run;" in text and "grpo.scale_rewards=none" in text
    pair = data["comparisons"]["DAPO (the paper's) - Dr. GRPO"]
    assert pair["diff"] > 0 and pair["lo"] > 0 and "| DAPO (the paper's) - GSPO | +" in text
    saved = json.loads((tmp_path / "out" / "loss_variants.json").read_text())
    assert saved["runs"]["GSPO"] == ["variant2_0", "variant2_1", "variant2_2"] and saved["lr"] == 5e-4


def test_write_equal_time_tables_and_comparisons(tmp_path):
    rows, steps = {}, {}
    for task in experiments.TASKS:
        rows[task] = {"SFT": [fake_run(tmp_path, f"{task}_sft_{s}", "sft", 40.0, BAD, 30.0, 0.4) for s in range(2)],
                      "SFT, equal time": [fake_run(tmp_path, f"{task}_sfteq_{s}", "sft", 50.0, GOOD, 40.0, 0.4)
                                          for s in range(2)],
                      "GRPO": [fake_run(tmp_path, f"{task}_grpo_{s}", "grpo", 45.0, BAD, 35.0, 2.0) for s in range(2)]}
        steps[task] = experiments.equal_time_steps(60, rows[task]["GRPO"], rows[task]["SFT"])
    data = experiments.write_equal_time(tmp_path / "out", rows, steps)
    text = (tmp_path / "out" / "table5_equal_time.md").read_text()
    assert "SFT at equal time: 300 (GRPO 2.00 s per step, SFT 0.40" in text
    for task in experiments.TASKS:
        c = data["tasks"][task]["comparisons"]
        # GRPO's BAD hypotheses against SFT's BAD ones: level; against GOOD ones: behind.
        assert c["GRPO - SFT"]["diff"] == pytest.approx(0.0) and c["GRPO - SFT, equal time"]["diff"] < 0
        assert data["tasks"][task]["summary"]["SFT, equal time"]["bleu"][0] == pytest.approx(50.0)
    assert json.loads((tmp_path / "out" / "equal_time.json").read_text())["steps"]["sqa"]["equal time"] == 300
