"""The experiment grid's aggregation: learning-rate choice on validation, mean ± std tables, plot.

    .venv/bin/python -m pytest -q tests/test_experiments.py
"""
import json

from grpo_speech.recipes import experiments
from grpo_speech.metrics import COLUMNS


def scores(x: float) -> dict:
    return {key: x + i for i, (key, _) in enumerate(COLUMNS)}


def result(base: float, method: str, trained: float, val: float, run: str) -> dict:
    return {"best_val_bleu": val, "results": {"base": scores(base), method: scores(trained)},
            "wall_seconds": 60.0, "run": run}


def test_pick_lr_uses_validation_and_prefers_the_smaller_rate_on_ties():
    res = {1e-4: {"best_val_bleu": 5.0}, 3e-4: {"best_val_bleu": 7.0}, 1e-3: {"best_val_bleu": 7.0}}
    assert experiments.pick_lr(res) == 3e-4


def test_table_mean_and_sample_std_by_hand():
    # BLEU 1, 2, 6: mean 3, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7) = 2.65.
    summary = experiments.summarize({"GRPO": [scores(1), scores(2), scores(6)]})
    assert summary["GRPO"]["bleu"] == (3.0, 7 ** 0.5)
    text = experiments.table(summary, {"GRPO": 3})
    assert "| GRPO | 3 | 3.00 ± 2.65 | 4.00 ± 2.65 |" in text


def test_write_results_makes_every_table_and_the_plot(tmp_path):
    headline = {task: {m: [result(1.0, m, 2.0 + s + (m == "grpo"), 3.0, f"{task}_{m}_{s}") for s in range(2)]
                       for m in ("sft", "grpo", "mpgrpo")} for task in experiments.TASKS}
    ablation = {"bleu": headline["sqa"]["grpo"]}
    for reward in experiments.ABLATION_REWARDS:
        ablation[reward] = [result(1.0, "grpo", 2.5, 3.0, f"r{reward}{s}") for s in range(2)]
    sweep = {(t, m): {1e-4: result(1.0, m, 2.0, 3.0, f"{t}{m}a"), 2e-4: result(1.0, m, 2.0, 4.0, f"{t}{m}b")}
             for t in experiments.TASKS for m in ("sft", "grpo")}
    chosen = {k: 2e-4 for k in sweep}
    data = experiments.write_results(tmp_path, chosen, sweep, headline, ablation)
    for name in ("table1_sqa.md", "table2_ast.md", "table3_rewards.md", "sweep.md", "results.md",
                 "fig1_mpgrpo.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    # GRPO on seeds 0 and 1: BLEU 3 and 4 -> 3.50 ± 0.71; the base row comes from the GRPO runs.
    assert "| GRPO | 2 | 3.50 ± 0.71 |" in (tmp_path / "table1_sqa.md").read_text()
    assert "| Base | 2 | 1.00 ± 0.00 |" in (tmp_path / "table2_ast.md").read_text()
    assert "| GRPO, METEOR reward | 2 | 2.50 ± 0.00 |" in (tmp_path / "table3_rewards.md").read_text()
    assert "| sqa | GRPO | 0.0002 | 4.00 | yes |" in (tmp_path / "sweep.md").read_text()
    # 12 headline + 8 ablation (the BLEU row is the headline GRPO) + 8 sweep runs, 1 min each;
    # a run listed twice (here the headline GRPO runs, again as the ablation's BLEU row) counts once.
    assert data["compute"].startswith("28 runs timed, 28.0 min")
    assert json.loads((tmp_path / "summary.json").read_text())["chosen_lr"]["ast/sft"] == 2e-4
