"""The paper's comparisons on the embedded default: `make experiments` (python -m grpo_speech.recipes.experiments).

    python -m grpo_speech.recipes.experiments                  # the whole grid, then the tables
    python -m grpo_speech.recipes.experiments --seeds 1 --steps 40   # a smaller grid
    python -m grpo_speech.recipes.experiments --loss-variants        # the loss-variant ablation alone
    python -m grpo_speech.recipes.experiments --equal-time           # GRPO, SFT and SFT at equal time alone

Grid (every run is `python -m grpo_speech train` on an experiments/tiny config, --steps steps):
  1. learning-rate sweeps, seed 0, on validation: SFT and GRPO on sqa and ast start from their
     window of LADDER; while the best rate (best validation BLEU) sits at an edge of what was run,
     the next rate of the ladder beyond that edge is run, so the chosen rate ends interior (or at
     the ladder's end, which the sweep table says). Test scores are never looked at to choose.
  2. headline, --seeds seeds, on sqa and ast at the chosen rates (MP-GRPO uses GRPO's):
       SFT at equal optimizer steps, GRPO, MP-GRPO with k = 1 (the paper's: the reference) and
       k = 2 (the reference and one other correct answer), then SFT at equal wall-clock: as many
       steps as fit in GRPO's training time, from the median seconds per step of the GRPO and
       SFT runs of every seed (`equal_time_steps`);
  3. reward ablation on sqa, every seed: GRPO with ROUGE-1, ROUGE-2, ROUGE-L and METEOR rewards at
     GRPO's rate (the BLEU row is the headline GRPO).
  4. (--loss-variants, instead of the grid above) loss variants on sqa, every seed, at GRPO's sqa
     rate from a finished grid's summary.json (or --lr): the paper's loss (DAPO), Dr. GRPO
     (loss_type=dr_grpo, scale_rewards=none) and GSPO (importance_sampling=sequence with GSPO's
     per-sequence mean, loss_type=grpo, num_iterations=2: sequence ratios act only from a second
     pass). GSPO keeps the grid's clip ranges (0.2): the paper's 3e-4/4e-4, chosen for large models
     at small rates, clipped nearly every token of the second pass on the tiny base at lr 5e-4
     (measured: 47 %, 47 %, 42 % of both passes' tokens over the first 3 steps, against 25 %, 2 %,
     0 % at 0.2), which would leave GSPO one-pass GRPO. The DAPO row is the headline GRPO run when
     it exists.
  5. (--equal-time, instead of the grid above) part 2's GRPO, SFT and SFT-at-equal-time rows alone
     at a finished grid's rates, for when the trainer's speed changes the equal-time budget
     (Table 5).
Each run's test numbers are those of its best validation checkpoint (`results.json`). Tables give
mean ± std over seeds; comparisons give a paired bootstrap 95 % interval of the test-BLEU
difference (`metrics.paired_bootstrap`, seeds pooled). Validation curves show whether runs
plateaued. Finished runs are skipped, so a stopped grid continues where it was. Outputs under
experiments/results/.
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

from grpo_speech.metrics import COLUMNS, MULTI_COLUMN, paired_bootstrap

TASKS = ("sqa", "ast")
LADDER = (2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
START = {"sft": (2e-4, 5e-4, 1e-3), "grpo": (1e-4, 2e-4, 5e-4)}
ABLATION_REWARDS = ("rouge1", "rouge2", "rougeL", "meteor")
REWARD_NAMES = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "meteor": "METEOR"}
# Headline rows: (name, method, k off-policy rows, equal wall-clock).
ROWS = (("SFT", "sft", 1, False), ("SFT, equal time", "sft", 1, True), ("GRPO", "grpo", 1, False),
        ("MP-GRPO k=1", "mpgrpo", 1, False), ("MP-GRPO k=2", "mpgrpo", 2, False))
COMPARISONS = (("GRPO", "SFT"), ("GRPO", "SFT, equal time"), ("MP-GRPO k=1", "GRPO"),
               ("MP-GRPO k=2", "MP-GRPO k=1"))
# Loss-variant rows (--loss-variants): (name, run-name suffix, config overrides).
LOSS_VARIANTS = (
    ("DAPO (the paper's)", "", ()),
    ("Dr. GRPO", "drgrpo", ("grpo.loss_type=dr_grpo", "grpo.scale_rewards=none")),
    ("GSPO", "gspo", ("grpo.loss_type=grpo", "grpo.importance_sampling=sequence", "grpo.num_iterations=2")),
)


def run_name(task: str, method: str, lr: float, seed: int, reward: str = "bleu", k: int = 1,
             steps: int = 0, variant: str = "") -> str:
    extra = (f"_k{k}" if method == "mpgrpo" else "") + (f"_n{steps}" if steps else "")
    return f"{task}_{method}_{reward}_lr{lr:g}_s{seed}{extra}" + (f"_{variant}" if variant else "")


def run_one(runs: Path, spec: tuple, overrides: list[str], threads: int = 0) -> dict:
    """Train (or find finished) one run; returns its results.json plus its run name, wall time,
    validation curve [(step, seconds of training so far, BLEU)] and seconds per step."""
    task, method, lr, seed, reward, k, steps = spec[:7]
    variant = spec[7] if len(spec) > 7 else ""  # a LOSS_VARIANTS suffix
    run_dir = runs / run_name(*spec)
    done = run_dir / "results.json"
    wall = run_dir / "wall_seconds.json"
    if not done.exists():
        cmd = [sys.executable, "-m", "grpo_speech", "train", "--config",
               f"experiments/tiny/{task}_{method}.yaml", f"run.dir={run_dir}", f"train.lr={lr}",
               f"train.seed={seed}", *overrides]
        if steps:
            cmd.append(f"train.max_steps={steps}")
        if method != "sft":
            cmd.append(f"grpo.reward={reward}")
        if method == "mpgrpo":
            cmd.append(f"grpo.off_policy_rows={k}")
        cmd += next(over for _, suffix, over in LOSS_VARIANTS if suffix == variant)
        log_path = runs / f"{run_dir.name}.log"
        before = 0.0
        resuming = (run_dir / "checkpoints").exists()
        if resuming:
            cmd.append("resume=true")
            before = killed_seconds(wall, log_path)
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_wall(wall, {"started": t0, "seconds_before": before})
        env = os.environ.copy()
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        with open(log_path, "a" if resuming else "w") as log:
            if resuming:
                log.write(f"\n--- resumed at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
                log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"run {run_dir.name} failed (exit {proc.returncode}); its log: {log_path}")
        write_wall(wall, {"seconds": before + time.time() - t0, "resumed": resuming})
    out = json.loads(done.read_text())
    out["wall_seconds"] = json.loads(wall.read_text()).get("seconds") if wall.exists() else None
    out["run"] = run_dir.name
    out["dir"] = str(run_dir)
    out["curve"], out["step_seconds"] = read_curve(run_dir / "metrics.jsonl")
    return out


def write_wall(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def killed_seconds(wall: Path, log: Path) -> float:
    """Wall seconds an interrupted run spent before it was resumed: from the start its
    wall_seconds.json recorded to the last write of its log (0 when either is missing)."""
    if not (wall.exists() and log.exists()):
        return 0.0
    record = json.loads(wall.read_text())
    if "started" not in record:
        return 0.0
    return record.get("seconds_before", 0.0) + max(0.0, log.stat().st_mtime - record["started"])


def read_curve(path: Path) -> tuple[list[tuple[int, float, float]], float]:
    """Validation BLEU per evaluation as (step, training seconds up to it, BLEU), and the median
    seconds per training step (evaluation time left out)."""
    if not path.exists():
        return [], 0.0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_step = {r["step"]: r["time/step"] for r in records if "time/step" in r}
    curve, elapsed, last = [], 0.0, 0
    for r in records:
        if "val/bleu" in r:
            elapsed += sum(per_step.get(s, 0.0) for s in range(last + 1, r["step"] + 1))
            last = r["step"]
            curve.append((r["step"], elapsed, r["val/bleu"]))
    return curve, (statistics.median(per_step.values()) if per_step else 0.0)


def pick_lr(results: dict[float, dict]) -> float:
    """The learning rate whose best validation BLEU is highest (ties: the smaller rate)."""
    return max(sorted(results), key=lambda lr: results[lr]["best_val_bleu"])


def next_rate(tried: list[float], chosen: float) -> float | None:
    """The ladder's next rate beyond the edge `chosen` sits at; None when it is interior or the
    ladder ends there."""
    tried = sorted(tried)
    i = LADDER.index(chosen)
    if chosen == tried[0] and i > 0:
        return LADDER[i - 1]
    if chosen == tried[-1] and i + 1 < len(LADDER):
        return LADDER[i + 1]
    return None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def columns_of(rows: dict[str, list[dict]]) -> tuple:
    every = [r for runs in rows.values() for r in runs]
    return COLUMNS + ((MULTI_COLUMN,) if every and all(MULTI_COLUMN[0] in r for r in every) else ())


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row name: [per-seed metric dicts]} -> {row name: {metric: (mean, std)}}."""
    cols = columns_of(rows)
    return {name: {key: mean_std([r[key] for r in runs]) for key, _ in cols}
            for name, runs in rows.items()}


def table(summary: dict[str, dict[str, tuple[float, float]]], n_seeds: dict[str, int]) -> str:
    """Markdown: one row per model, the metrics as mean ± std over seeds."""
    cols = [c for c in COLUMNS + (MULTI_COLUMN,) if all(c[0] in s for s in summary.values())]
    lines = ["| model | seeds | " + " | ".join(title for _, title in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name, scores in summary.items():
        cells = [f"{scores[key][0]:.2f} ± {scores[key][1]:.2f}" for key, _ in cols]
        lines.append(f"| {name} | {n_seeds[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_hyps(run: dict, method: str) -> tuple[list[str], list[str]]:
    """A run's test hypotheses of best/ and the test references they align with."""
    d = Path(run["dir"])
    hyps = (d / f"test_hyps_{method}.txt").read_text(encoding="utf-8").splitlines()
    refs = [json.loads(line)[0] for line in
            (d / "test_references.jsonl").read_text(encoding="utf-8").splitlines()]
    return hyps, refs


def compare(a: list[dict], method_a: str, b: list[dict], method_b: str, seed: int = 0) -> dict:
    """Paired bootstrap of test BLEU between two rows (each a list of per-seed runs)."""
    hyps_a, refs = zip(*(read_hyps(r, method_a) for r in a))
    hyps_b, refs_b = zip(*(read_hyps(r, method_b) for r in b))
    if any(r != refs[0] for r in refs + refs_b):
        raise ValueError("runs compared on different test references")
    return paired_bootstrap(list(hyps_a), list(hyps_b), refs[0], seed=seed)


def comparison_table(pairs: dict[str, dict]) -> str:
    lines = ["| comparison (test BLEU) | difference | 95 % interval | resamples where the first is better |",
             "|---|---:|---|---:|"]
    for name, c in pairs.items():
        lines.append(f"| {name} | {c['diff']:+.2f} | [{c['lo']:+.2f}, {c['hi']:+.2f}] | "
                     f"{100 * c['p_a_better']:.1f} % |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict[str, list[list[tuple]]]], path: Path) -> None:
    """Validation BLEU (mean over seeds) against steps and against training seconds, per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(10, 3.6 * len(curves)), squeeze=False)
    for row, (task, rows) in enumerate(curves.items()):
        for name, runs in rows.items():
            runs = [c for c in runs if c]
            if not runs:
                continue
            n = min(len(c) for c in runs)
            steps = [runs[0][i][0] for i in range(n)]
            secs = [statistics.fmean(c[i][1] for c in runs) for i in range(n)]
            bleu = [statistics.fmean(c[i][2] for c in runs) for i in range(n)]
            axes[row][0].plot(steps, bleu, marker="o", markersize=3, label=name)
            axes[row][1].plot(secs, bleu, marker="o", markersize=3, label=name)
        for col, xlabel in enumerate(("optimizer step", "training seconds (one run)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation BLEU")
            ax.set_title(f"{task}: validation BLEU, mean over seeds")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_all(runs: Path, specs: list[tuple], overrides: list[str], jobs: int) -> dict[tuple, dict]:
    """Run every spec (task, method, lr, seed, reward, k, steps[, loss variant]), `jobs` at a time (one torch thread
    each when jobs > 1: on a small CPU, threads of parallel runs only wait for each other)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = list(dict.fromkeys(specs))
    threads = 1 if jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda spec: run_one(runs, spec, overrides, threads), specs)
        return dict(zip(specs, results))


def run_grid(args) -> dict:
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    overrides = list(args.override)
    seeds = list(range(args.seeds))
    n = args.steps

    # 1. Learning-rate sweeps on validation (seed 0), widened until the choice is interior.
    pairs = [(task, method) for task in TASKS for method in START]
    tried = {pair: list(START[pair[1]]) for pair in pairs}
    sweep: dict[tuple, dict[float, dict]] = {}
    while True:
        specs = [(t, m, lr, 0, "bleu", 1, n) for (t, m) in pairs for lr in tried[(t, m)]]
        done = run_all(runs, specs, overrides, args.jobs)
        sweep = {(t, m): {lr: done[(t, m, lr, 0, "bleu", 1, n)] for lr in tried[(t, m)]}
                 for (t, m) in pairs}
        wider = {p: next_rate(tried[p], pick_lr(sweep[p])) for p in pairs}
        if all(r is None for r in wider.values()):
            break
        for p, r in wider.items():
            if r is not None:
                tried[p].append(r)
    chosen = {p: pick_lr(sweep[p]) for p in pairs}

    # 2. Headline rows and 3. the reward ablation, every seed; SFT at equal time last (its
    # step count comes from the others' step times).
    def lr_of(task, method):
        return chosen[(task, "grpo" if method == "mpgrpo" else method)]

    def spec(task, method, k, s, steps=n, reward="bleu"):
        return (task, method, lr_of(task, method), s, reward, k, steps)

    specs = [spec(t, m, k, s) for t in TASKS for _, m, k, eq in ROWS if not eq for s in seeds]
    specs += [spec("sqa", "grpo", 1, s, reward=r) for r in ABLATION_REWARDS for s in seeds]
    done = run_all(runs, specs, overrides, args.jobs)
    steps = {t: equal_time_steps(n, [done[spec(t, "grpo", 1, s)] for s in seeds],
                                 [done[spec(t, "sft", 1, s)] for s in seeds]) for t in TASKS}
    done.update(run_all(runs, [spec(t, "sft", 1, s, steps[t]["equal time"]) for t in TASKS for s in seeds],
                        overrides, args.jobs))
    headline = {t: {name: [done[spec(t, m, k, s, steps[t]["equal time"] if eq else n)] for s in seeds]
                    for name, m, k, eq in ROWS} for t in TASKS}
    ablation = {"bleu": headline["sqa"]["GRPO"]}
    for r in ABLATION_REWARDS:
        ablation[r] = [done[spec("sqa", "grpo", 1, s, reward=r)] for s in seeds]
    return write_results(Path(args.out), chosen, sweep, headline, ablation, steps)


def equal_time_steps(n: int, grpo_runs: list[dict], sft_runs: list[dict]) -> dict:
    """SFT steps that take as long as n GRPO steps: n times the ratio of the median seconds per
    step of the GRPO runs to that of the SFT runs (each run's own median, evaluation left out).
    The median over every seed, not one run's: a run that shared the CPU with heavier work (the
    grid runs two at a time) would otherwise set the budget of all of them."""
    grpo = statistics.median(r["step_seconds"] for r in grpo_runs)
    sft = statistics.median(r["step_seconds"] for r in sft_runs)
    return {"equal steps": n, "equal time": max(n, round(n * grpo / max(sft, 1e-9))),
            "grpo_seconds_per_step": grpo, "sft_seconds_per_step": sft}


def method_of(name: str) -> str:
    return next(m for row, m, _, _ in ROWS if row == name)


def write_results(out: Path, chosen, sweep, headline, ablation, steps) -> dict:
    """Tables (markdown), comparisons, curves and summary.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary, sections, comparisons, curves = {}, [], {}, {}
    titles = {"sqa": "Table 1: spoken question answering (synthetic sqa), test split",
              "ast": "Table 2: speech translation en->de (synthetic ast), test split"}
    for task in TASKS:
        per_seed = {"Base": [r["results"]["base"] for r in headline[task]["GRPO"]]}
        for name, runs in headline[task].items():
            per_seed[name] = [r["results"][method_of(name)] for r in runs]
        summary[task] = summarize(per_seed)
        text = table(summary[task], {k: len(v) for k, v in per_seed.items()})
        text += (f"\n\nSteps: {steps[task]['equal steps']} each; SFT at equal time: "
                 f"{steps[task]['equal time']}")
        if "grpo_seconds_per_step" in steps[task]:
            text += (f" (GRPO {steps[task]['grpo_seconds_per_step']:.2f} s per step, SFT "
                     f"{steps[task]['sft_seconds_per_step']:.2f}: medians over seeds)")
        text += "."
        comparisons[task] = {f"{a} - {b}": compare(headline[task][a], method_of(a), headline[task][b],
                                                   method_of(b)) for a, b in COMPARISONS}
        text += "\n\n" + comparison_table(comparisons[task])
        (out / f"table{1 if task == 'sqa' else 2}_{task}.md").write_text(f"## {titles[task]}\n\n{text}\n")
        sections.append(f"## {titles[task]}\n\n{text}")
        curves[task] = {name: [r["curve"] for r in runs] for name, runs in headline[task].items()}

    per_reward = {f"GRPO, {REWARD_NAMES[r]} reward": [x["results"]["grpo"] for x in runs]
                  for r, runs in ablation.items()}
    summary["rewards"] = summarize(per_reward)
    text = table(summary["rewards"], {k: len(v) for k, v in per_reward.items()})
    comparisons["rewards"] = {f"BLEU reward - {REWARD_NAMES[r]} reward": compare(
        ablation["bleu"], "grpo", runs, "grpo") for r, runs in ablation.items() if r != "bleu"}
    text += "\n\n" + comparison_table(comparisons["rewards"])
    (out / "table3_rewards.md").write_text(f"## Table 3: reward ablation on sqa, test split\n\n{text}\n")
    sections.append(f"## Table 3: reward ablation on sqa, test split\n\n{text}")

    lines = ["| task | method | learning rate | best validation BLEU | chosen |", "|---|---|---:|---:|---|"]
    for (task, method), res in sweep.items():
        for lr, r in sorted(res.items()):
            mark = ""
            if lr == chosen[(task, method)]:
                interior = min(res) < lr < max(res)
                mark = "yes" if interior else "yes (end of the ladder)"
            lines.append(f"| {task} | {method.upper()} | {lr:g} | {r['best_val_bleu']:.2f} | {mark} |")
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
    plot_curves(curves, out / "curves.png")
    best_steps = {t: {name: [r["best_step"] for r in runs] for name, runs in g.items()}
                  for t, g in headline.items()}
    sections.append("## Validation curves\n\n![validation BLEU](curves.png)\n\nBest validation "
                    "step per run: " + "; ".join(f"{t} {name} {steps_}" for t, g in best_steps.items()
                                                  for name, steps_ in g.items()))
    (out / "results.md").write_text("\n\n".join(sections) + f"\n\nCompute: {compute}.\n")
    data = {"chosen_lr": {f"{t}/{m}": lr for (t, m), lr in chosen.items()}, "compute": compute,
            "steps": steps, "best_steps": best_steps, "comparisons": comparisons,
            "summary": {k: {row: {m: list(v) for m, v in s.items()} for row, s in rows.items()}
                        for k, rows in summary.items()},
            "runs": {task: {m: [r["run"] for r in rs] for m, rs in g.items()} for task, g in headline.items()}}
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print((out / "results.md").read_text())
    return data


def run_loss_variants(args) -> dict:
    """The loss-variant ablation (grid part 4) alone: LOSS_VARIANTS on sqa, --seeds seeds, --steps
    steps, at GRPO's sqa learning rate (--lr, else the one a finished grid chose, from
    --out/summary.json)."""
    lr = args.lr
    if lr is None:
        summary = Path(args.out) / "summary.json"
        if not summary.exists():
            raise SystemExit(f"--loss-variants needs --lr or a finished grid's {summary}")
        lr = json.loads(summary.read_text())["chosen_lr"]["sqa/grpo"]
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    specs = {(name, s): ("sqa", "grpo", lr, s, "bleu", 1, args.steps, suffix)
             for name, suffix, _ in LOSS_VARIANTS for s in range(args.seeds)}
    done = run_all(runs, list(specs.values()), list(args.override), args.jobs)
    rows = {name: [done[specs[(name, s)]] for s in range(args.seeds)] for name, _, _ in LOSS_VARIANTS}
    return write_loss_variants(Path(args.out), rows, lr, args.steps)


def write_loss_variants(out: Path, rows: dict[str, list[dict]], lr: float, steps: int) -> dict:
    """Table 4 (markdown) and loss_variants.json under `out`: the rows' test scores (mean ± std
    over seeds) and the paired bootstrap of the paper's loss against each other variant."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed = {name: [r["results"]["grpo"] for r in runs] for name, runs in rows.items()}
    summary = summarize(per_seed)
    first = LOSS_VARIANTS[0][0]
    pairs = {f"{first} - {name}": compare(rows[first], "grpo", runs, "grpo")
             for name, runs in rows.items() if name != first}
    text = (table(summary, {k: len(v) for k, v in per_seed.items()}) +
            f"\n\nGRPO on sqa at lr {lr:g}, {steps} steps a run; " +
            "; ".join(f"{name}: {' '.join(over) or 'the defaults'}" for name, _, over in LOSS_VARIANTS) +
            ".\n\n" + comparison_table(pairs))
    (out / "table4_loss_variants.md").write_text(f"## Table 4: loss variants on sqa, test split\n\n{text}\n")
    data = {"lr": lr, "steps": steps, "comparisons": pairs,
            "summary": {row: {m: list(v) for m, v in s.items()} for row, s in summary.items()},
            "runs": {name: [r["run"] for r in runs] for name, runs in rows.items()}}
    (out / "loss_variants.json").write_text(json.dumps(data, indent=1) + "\n")
    print((out / "table4_loss_variants.md").read_text())
    return data


def run_equal_time(args) -> dict:
    """The equal-time comparison alone, at the rates of a finished grid (--out/summary.json): per
    task the GRPO and SFT rows (--seeds seeds, --steps steps), whose median step times set the
    equal-time step count, then SFT at that count. For a change of the step's cost (the trainer's
    own speed), without the sweeps and the other rows. Writes table5_equal_time.md and
    equal_time.json under --out."""
    summary = Path(args.out) / "summary.json"
    if not summary.exists():
        raise SystemExit(f"--equal-time needs a finished grid's {summary} (its learning rates)")
    rates = json.loads(summary.read_text())["chosen_lr"]
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    seeds, n, overrides = range(args.seeds), args.steps, list(args.override)

    def spec(task, method, s, steps=n):
        return (task, method, rates[f"{task}/{method}"], s, "bleu", 1, steps)

    done = run_all(runs, [spec(t, m, s) for t in TASKS for m in ("grpo", "sft") for s in seeds], overrides, args.jobs)
    steps = {t: equal_time_steps(n, [done[spec(t, "grpo", s)] for s in seeds],
                                 [done[spec(t, "sft", s)] for s in seeds]) for t in TASKS}
    done.update(run_all(runs, [spec(t, "sft", s, steps[t]["equal time"]) for t in TASKS for s in seeds],
                        overrides, args.jobs))
    rows = {t: {"SFT": [done[spec(t, "sft", s)] for s in seeds],
                "SFT, equal time": [done[spec(t, "sft", s, steps[t]["equal time"])] for s in seeds],
                "GRPO": [done[spec(t, "grpo", s)] for s in seeds]} for t in TASKS}
    return write_equal_time(Path(args.out), rows, steps)


def write_equal_time(out: Path, rows: dict, steps: dict) -> dict:
    """Table 5 (markdown) and equal_time.json: per task the rows' test scores (mean ± std over
    seeds), the step counts and times, and GRPO against SFT at equal steps and at equal time."""
    out.mkdir(parents=True, exist_ok=True)
    text, data = "## Table 5: SFT at equal training time, test split\n", {"steps": steps, "tasks": {}}
    for task, by_row in rows.items():
        per_seed = {name: [r["results"][method_of(name)] for r in runs] for name, runs in by_row.items()}
        pairs = {f"GRPO - {name}": compare(by_row["GRPO"], "grpo", by_row[name], "sft")
                 for name in ("SFT", "SFT, equal time")}
        st = steps[task]
        text += (f"\n### {task}\n\n{table(summarize(per_seed), {k: len(v) for k, v in per_seed.items()})}\n\n"
                 f"Steps: {st['equal steps']} each; SFT at equal time: {st['equal time']} (GRPO "
                 f"{st['grpo_seconds_per_step']:.2f} s per step, SFT {st['sft_seconds_per_step']:.2f}: "
                 f"medians over seeds).\n\n{comparison_table(pairs)}\n")
        data["tasks"][task] = {"comparisons": pairs,
                               "summary": {k: {m: list(v) for m, v in s.items()} for k, s in summarize(per_seed).items()},
                               "runs": {name: [r["run"] for r in runs] for name, runs in by_row.items()}}
    (out / "table5_equal_time.md").write_text(text)
    (out / "equal_time.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)
    return data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m grpo_speech.recipes.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default="runs/grid", help="where each run's directory goes")
    p.add_argument("--out", default="experiments/results", help="tables, plots and summary.json")
    p.add_argument("--seeds", type=int, default=3, help="seeds of every headline and ablation row")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (SFT at "
                   "equal time gets more)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--loss-variants", action="store_true", help="run the loss-variant ablation on sqa "
                   "(DAPO, Dr. GRPO, GSPO) instead of the grid")
    p.add_argument("--lr", type=float, default=None, help="--loss-variants: the learning rate (default: "
                   "the sqa GRPO rate of --out/summary.json)")
    p.add_argument("--equal-time", action="store_true", help="rerun only GRPO, SFT and SFT at equal time "
                   "(the step count from this run's step times) at a finished grid's rates")
    p.add_argument("override", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args(argv)
    if args.equal_time:
        return run_equal_time(args)
    return run_loss_variants(args) if args.loss_variants else run_grid(args)


if __name__ == "__main__":
    main()
