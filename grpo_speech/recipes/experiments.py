"""The paper's comparisons on the embedded default: `make experiments` (python -m grpo_speech.recipes.experiments).

    python -m grpo_speech.recipes.experiments            # the whole grid, then the tables
    python -m grpo_speech.recipes.experiments --seeds 1 train.max_steps=40   # a smaller grid

Grid (every run is `python -m grpo_speech train` on an experiments/tiny config):
  1. learning-rate sweep, seed 0: SFT and GRPO on sqa and ast, each over its SWEEP list; the
     learning rate with the best validation BLEU (best checkpoint) is kept. Test scores are never
     looked at to choose anything.
  2. headline, SEEDS seeds: SFT, GRPO and MP-GRPO on sqa and ast at the chosen learning rates
     (MP-GRPO uses GRPO's), giving Tables 1 and 2 and the Fig. 1 bars;
  3. reward ablation on sqa (--ablation-seeds seeds): GRPO with ROUGE-1, ROUGE-2, ROUGE-L and METEOR rewards
     at GRPO's learning rate (the BLEU row is the headline GRPO), giving Table 3.
Each run's test numbers are those of its best validation checkpoint (`results.json`). Finished
runs are skipped, so a stopped grid continues where it was. Outputs under experiments/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from grpo_speech.metrics import COLUMNS

TASKS = ("sqa", "ast")
SWEEP = {"sft": (1e-4, 3e-4, 1e-3), "grpo": (1e-4, 2e-4, 5e-4)}
ABLATION_REWARDS = ("rouge1", "rouge2", "rougeL", "meteor")
REWARD_NAMES = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "meteor": "METEOR"}
METHOD_NAMES = {"sft": "SFT", "grpo": "GRPO", "mpgrpo": "MP-GRPO"}


def run_name(task: str, method: str, lr: float, seed: int, reward: str = "bleu") -> str:
    return f"{task}_{method}_{reward}_lr{lr:g}_s{seed}"


def run_one(runs: Path, task: str, method: str, lr: float, seed: int, reward: str,
            overrides: list[str], threads: int = 0) -> dict:
    """Train (or find finished) one run; returns its results.json plus the wall time it took."""
    run_dir = runs / run_name(task, method, lr, seed, reward)
    done = run_dir / "results.json"
    if not done.exists():
        cmd = [sys.executable, "-m", "grpo_speech", "train", "--config",
               f"experiments/tiny/{task}_{method}.yaml", f"run.dir={run_dir}", f"train.lr={lr}",
               f"train.seed={seed}", *overrides]
        if method != "sft":
            cmd.append(f"grpo.reward={reward}")
        if (run_dir / "checkpoints").exists():
            cmd.append("resume=true")
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.time()
        env = os.environ.copy()
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        with open(runs / f"{run_dir.name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"run {run_dir.name} failed (exit {proc.returncode}); its log: "
                             f"{runs / (run_dir.name + '.log')}")
        (run_dir / "wall_seconds.json").write_text(json.dumps({"seconds": time.time() - t0}) + "\n")
    out = json.loads(done.read_text())
    wall = run_dir / "wall_seconds.json"
    out["wall_seconds"] = json.loads(wall.read_text())["seconds"] if wall.exists() else None
    out["run"] = run_dir.name
    return out


def pick_lr(results: dict[float, dict]) -> float:
    """The learning rate whose best validation BLEU is highest (ties: the smaller rate)."""
    return max(sorted(results), key=lambda lr: results[lr]["best_val_bleu"])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row name: [per-seed metric dicts]} -> {row name: {metric: (mean, std)}}."""
    return {name: {key: mean_std([r[key] for r in runs]) for key, _ in COLUMNS}
            for name, runs in rows.items()}


def table(summary: dict[str, dict[str, tuple[float, float]]], n_seeds: dict[str, int]) -> str:
    """Markdown: one row per model, the six metrics as mean ± std over seeds."""
    lines = ["| model | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for name, scores in summary.items():
        cells = [f"{scores[key][0]:.2f} ± {scores[key][1]:.2f}" for key, _ in COLUMNS]
        lines.append(f"| {name} | {n_seeds[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fig1(summary: dict[str, dict[str, dict[str, tuple[float, float]]]], path: Path) -> None:
    """Fig. 1 style: test BLEU of GRPO and MP-GRPO (and the base) on each task, error bars = std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = ["Base", "GRPO", "MP-GRPO"]
    width = 0.25
    for i, name in enumerate(names):
        xs = [t + (i - 1) * width for t in range(len(TASKS))]
        means = [summary[task][name]["bleu"][0] for task in TASKS]
        stds = [summary[task][name]["bleu"][1] for task in TASKS]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(TASKS)), [t.upper() for t in TASKS])
    ax.set_ylabel("test BLEU")
    ax.set_title("GRPO vs mixed-policy GRPO (tiny base, synthetic speech)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(runs: Path, specs: list[tuple], overrides: list[str], jobs: int) -> dict[tuple, dict]:
    """Run every (task, method, lr, seed, reward) in specs, `jobs` at a time (one torch thread
    each when jobs > 1: on a small CPU, threads of parallel runs only wait for each other)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = list(dict.fromkeys(specs))
    threads = 1 if jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda spec: run_one(runs, *spec, overrides, threads), specs)
        return dict(zip(specs, results))


def run_grid(args) -> dict:
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    overrides = list(args.override)
    seeds = list(range(args.seeds))

    # 1. Learning-rate sweeps on validation (seed 0).
    specs = [(task, method, lr, 0, "bleu") for task in TASKS for method, lrs in SWEEP.items() for lr in lrs]
    done = run_all(runs, specs, overrides, args.jobs)
    chosen, sweep = {}, {}
    for task in TASKS:
        for method, lrs in SWEEP.items():
            sweep[(task, method)] = {lr: done[(task, method, lr, 0, "bleu")] for lr in lrs}
            chosen[(task, method)] = pick_lr(sweep[(task, method)])

    # 2. Headline comparison and 3. reward ablation, every seed.
    def lr_of(task, method):
        return chosen[(task, "grpo" if method == "mpgrpo" else method)]
    specs = [(task, method, lr_of(task, method), s, "bleu") for task in TASKS
             for method in ("sft", "grpo", "mpgrpo") for s in seeds]
    ablation_seeds = seeds[:args.ablation_seeds] if args.ablation_seeds else seeds
    specs += [("sqa", "grpo", lr_of("sqa", "grpo"), s, reward) for reward in ABLATION_REWARDS
              for s in ablation_seeds]
    done = run_all(runs, specs, overrides, args.jobs)
    headline = {task: {method: [done[(task, method, lr_of(task, method), s, "bleu")] for s in seeds]
                       for method in ("sft", "grpo", "mpgrpo")} for task in TASKS}
    ablation = {"bleu": headline["sqa"]["grpo"]}
    for reward in ABLATION_REWARDS:
        ablation[reward] = [done[("sqa", "grpo", lr_of("sqa", "grpo"), s, reward)] for s in ablation_seeds]
    return write_results(Path(args.out), chosen, sweep, headline, ablation)


def write_results(out: Path, chosen, sweep, headline, ablation) -> dict:
    """Tables (markdown), the Fig. 1 plot and summary.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary, sections = {}, []
    titles = {"sqa": "Table 1: spoken question answering (synthetic sqa), test split",
              "ast": "Table 2: speech translation en->de (synthetic ast), test split"}
    for task in TASKS:
        per_seed = {"Base": [r["results"]["base"] for r in headline[task]["grpo"]]}
        for method in ("sft", "grpo", "mpgrpo"):
            per_seed[METHOD_NAMES[method]] = [r["results"][method] for r in headline[task][method]]
        summary[task] = summarize(per_seed)
        text = table(summary[task], {k: len(v) for k, v in per_seed.items()})
        (out / f"table{1 if task == 'sqa' else 2}_{task}.md").write_text(f"## {titles[task]}\n\n{text}\n")
        sections.append(f"## {titles[task]}\n\n{text}")
    per_reward = {f"GRPO, {REWARD_NAMES[r]} reward": [x["results"]["grpo"] for x in runs]
                  for r, runs in ablation.items()}
    summary["rewards"] = summarize(per_reward)
    text = table(summary["rewards"], {k: len(v) for k, v in per_reward.items()})
    (out / "table3_rewards.md").write_text(f"## Table 3: reward ablation on sqa, test split\n\n{text}\n")
    sections.append(f"## Table 3: reward ablation on sqa, test split\n\n{text}")

    lines = ["| task | method | learning rate | best validation BLEU | chosen |", "|---|---|---:|---:|---|"]
    for (task, method), res in sweep.items():
        for lr, r in sorted(res.items()):
            lines.append(f"| {task} | {METHOD_NAMES[method]} | {lr:g} | {r['best_val_bleu']:.2f} | "
                         f"{'yes' if lr == chosen[(task, method)] else ''} |")
    sections.append("## Learning-rate sweeps (seed 0, validation split)\n\n" + "\n".join(lines))
    (out / "sweep.md").write_text(sections[-1] + "\n")

    # Every distinct run once (the sweep's chosen seed-0 runs are also headline runs).
    every = [r for group in headline.values() for rs in group.values() for r in rs]
    every += [r for rs in sweep.values() for r in rs.values()]
    every += [r for rs in ablation.values() for r in rs]
    walls = [w for w in {r["run"]: r["wall_seconds"] for r in every}.values() if w]
    compute = (f"{len(walls)} runs timed, {sum(walls) / 60:.1f} min in all "
               f"(mean {statistics.fmean(walls) / 60:.1f} min per run, wall clock of each run)"
               ) if walls else "no timings"
    plot_fig1({task: summary[task] for task in TASKS}, out / "fig1_mpgrpo.png")
    (out / "results.md").write_text("\n\n".join(sections) + f"\n\nCompute: {compute}.\n\n"
                                    "![Fig. 1](fig1_mpgrpo.png)\n")
    data = {"chosen_lr": {f"{t}/{m}": lr for (t, m), lr in chosen.items()}, "compute": compute,
            "summary": {k: {row: {m: list(v) for m, v in s.items()} for row, s in rows.items()}
                        for k, rows in summary.items()},
            "runs": {task: {m: [r["run"] for r in rs] for m, rs in g.items()} for task, g in headline.items()}}
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print((out / "results.md").read_text())
    return data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m grpo_speech.recipes.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default="runs/grid", help="where each run's directory goes")
    p.add_argument("--out", default="experiments/results", help="tables, plot and summary.json")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the headline and ablation runs")
    p.add_argument("--ablation-seeds", type=int, default=0,
                   help="seeds of the reward ablation (0: --seeds; its BLEU row keeps every seed)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("override", nargs="*", help="config overrides for every run (key=value)")
    return run_grid(p.parse_args(argv))


if __name__ == "__main__":
    main()
