"""The training loop: SFT, GRPO and MP-GRPO (method=sft|grpo|mpgrpo) in one readable function.

    python -m grpo_speech train --config experiments/tiny/ast_grpo.yaml            # one CPU process
    python -m grpo_speech train --config experiments/granite-speech-2b/ast_grpo.yaml   # one GPU
    torchrun --nproc_per_node=4 -m grpo_speech train --config experiments/granite-speech-2b/ast_grpo.yaml

Simplifications, on purpose: one rollout batch per optimiser step (`num_iterations` passes over
it); the model is in eval mode throughout (no dropout, so s = 1 exactly on the first pass);
every random choice of a step (data order, prompt template, sampling) is derived from
(seed, step), so a resumed run replays exactly what the killed run would have done.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from grpo_speech import checkpoint, distributed
from grpo_speech.config import Config, GRPOConfig, UserError
from grpo_speech.data import collate, load_split
from grpo_speech.data.collate import chat_prompt, pad_audio, prompt_lengths, to_device
from grpo_speech.data.loader import loader
from grpo_speech.data.prompts import Prompts, format_prompt, run_prompts
from grpo_speech.data.rows import DataError
from grpo_speech.evaluate import LANG, evaluate_split, plot_run, write_results
from grpo_speech.log import Logger, dump_rollouts, rollout_counts, step_record, truncate_log
from grpo_speech.loss import group_advantages, policy_loss, sft_loss
from grpo_speech.model import (
    base_identity, default_base_path, load_model, make_reference, place_model, recompute_layers, save_best,
)
from grpo_speech.rewards import get_reward, load_bertscore
from grpo_speech.rollout import (
    Rollout,
    add_reference_samples,
    audio_trainable,
    encode_audio,
    sample_groups,
    sequence_logprobs,
    tokenize_targets,
)


def lr_lambda(step: int, max_steps: int, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    warmup = int(round(warmup_ratio * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_indices(step: int, n_examples: int, prompts_per_step: int, seed: int) -> list[int]:
    """The global example indices of one step: consecutive slices of per-epoch permutations."""
    out = []
    for position in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, i = divmod(position, n_examples)
        gen = torch.Generator().manual_seed(distributed.step_seed(seed, "data-order", epoch))
        order = torch.randperm(n_examples, generator=gen)
        out.append(int(order[i]))
    return out


def micro_batches(n_prompts: int, group_size: int, micro_batch_size: int) -> list[list[int]]:
    """Prompt indices per micro-batch: whole groups, about `micro_batch_size` rows each."""
    per = max(1, micro_batch_size // group_size)
    return [list(range(i, min(i + per, n_prompts))) for i in range(0, n_prompts, per)]


def rows_of(prompt_idx: list[int], group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows p*G+g of the prompts in `prompt_idx` (row p*G+g belongs to prompt p)."""
    return torch.tensor([p * group_size + g for p in prompt_idx for g in range(group_size)], device=device)


def rank_micro_batches(mask_BT: torch.Tensor, n_prompts: int, group_size: int, micro_batch_size: int,
                       device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches as (rows, loss mask of those rows), as many on every rank.

    Every FSDP forward and backward is a collective, so all ranks must run the same number of
    them; with data.skip_bad a rank may hold fewer prompts than another. Ranks agree on the
    largest count and a rank with fewer repeats its last micro-batch under an all-zero mask: its
    forward and backward add nothing to the loss, the gradient or the metrics. mask_BT: (B, T)
    the step's loss mask, already 0 on rows that count nothing (a placeholder prompt's)."""
    mine = [rows_of(idx, group_size, device) for idx in micro_batches(n_prompts, group_size, micro_batch_size)]
    n = distributed.all_reduce_max(len(mine))
    return ([(rows, mask_BT[rows]) for rows in mine]
            + [(mine[-1], torch.zeros_like(mask_BT[mine[-1]]))] * (n - len(mine)))


@dataclasses.dataclass(frozen=True)
class Method:
    """What SFT, GRPO and MP-GRPO change in the loop, read once from the config: the stages run
    the same code for all three (rollout_step and policy_update read it)."""
    group_size: int
    """G completions per prompt (SFT: 1, the reference answer)."""
    passes: int
    """Optimisation passes over the step's rows (grpo.num_iterations; SFT: 1)."""
    temperature: float
    """What log-probs are scored at: the sampling temperature (greedy rollouts and SFT: 1)."""
    samples: bool
    """Completions are sampled, rewarded and trained on with the policy loss (GRPO, MP-GRPO);
    False: SFT's negative log-likelihood of the reference answer."""
    reference_rows: bool
    """MP-GRPO: the last rows of each group are correct answers, not samples."""

    @classmethod
    def of(cls, cfg: Config) -> "Method":
        sft = cfg.method == "sft"
        return cls(group_size=1 if sft else cfg.grpo.group_size, passes=1 if sft else cfg.grpo.num_iterations,
                   temperature=1.0 if sft else (cfg.grpo.temperature or 1.0), samples=not sft,
                   reference_rows=cfg.method == "mpgrpo")


class Laps:
    """Seconds per phase of one step (time/<phase> in metrics.jsonl); the phases follow each other
    without gaps, so they add up to time/step."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.last = device, {}, _clock(device)

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (added up when a phase recurs)."""
        now = _clock(self.device)
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return sum(self.times.values())


@dataclasses.dataclass
class StepPlan:
    """One step's rows on this rank and what their loss needs, fixed before the passes."""
    micro: list[tuple[torch.Tensor, torch.Tensor]]
    """Micro-batches as (rows, loss mask): rank_micro_batches. The masks are the one place where a
    row that counts nothing (a placeholder prompt's, a repeated micro-batch's) is zeroed."""
    advantages_B: torch.Tensor
    off_policy_B: torch.Tensor
    num_tokens: float
    """The step's completion tokens over all micro-batches and ranks."""
    denominators: list[float]
    """What divides each micro-batch's summed loss (loss_denominators)."""
    old_lp: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    ref_lp: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def train(cfg: Config) -> dict:
    dist = distributed.init_distributed()
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    method = Method.of(cfg)
    G = method.group_size
    if cfg.train.prompts_per_step % dist.world_size:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of "
                         f"the number of ranks ({dist.world_size})")
    if method.reference_rows and G < 2:
        raise ValueError("method=mpgrpo needs grpo.group_size >= 2 (G-1 samples plus the reference)")
    cfg = checkpoint.resolve_resume(cfg)  # run.resume=auto: resume when run.dir holds checkpoints
    checkpoint.prepare_run_dir(cfg, is_main=dist.is_main)  # one run per run.dir, held locked
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    # 0. Model, frozen reference, optimiser, data, reward; the step to start from.
    model, ref_model, processor, n_trainable, base = build_models(cfg, dist)
    tokenizer, device = processor.tokenizer, dist.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.train.max_steps, cfg.train.warmup_ratio))
    # Training with reward=bertscore scores like evaluation: the eval.bertscore_* model and layer.
    # The model the final test scoring needs is loaded (or refused) now, not hours into the run.
    lang = LANG[cfg.task]
    reward_fn = None if not method.samples else get_reward(
        cfg.grpo.reward, bertscore_model=cfg.eval.bertscore_model, bertscore_layers=cfg.eval.bertscore_layers,
        lang=lang)
    if cfg.run.evaluate:
        load_bertscore(cfg.eval.bertscore_model, cfg.eval.bertscore_layers, lang)
    train_examples, val_examples, prompts = load_data(cfg, dist, model, tokenizer, n_trainable)
    start_step, best = start_state(cfg, dist, model, optimizer, scheduler, prompts, base)
    # The starting model's validation score is the first point of the curve and the bar to beat.
    base_val = None
    if start_step == 0 and cfg.run.evaluate:
        base_val = evaluate_split(model, processor, val_examples, cfg, dist, split="validation")
        best = {"step": 0, "score": base_val[cfg.eval.metric]}
        save_best(model, processor, run_dir / "best", dist, base["path"])

    progress = distributed.progress(range(start_step, cfg.train.max_steps), dist, desc=cfg.method)
    logger = Logger.open(run_dir, is_main=dist.is_main, console=progress.set_postfix_str,
                         console_every=cfg.train.log_every, tensorboard=cfg.run.tensorboard,
                         wandb=cfg.run.wandb)
    if base_val is not None:
        logger.log({"step": 0, f"val/{cfg.eval.metric}": base_val[cfg.eval.metric]})
    bad_streak = 0
    stop = StopRequests(cfg.run.stop_signals)
    stalls = Stalls(cfg.train.stall_steps, grpo=method.samples)
    last_save = time.monotonic()
    batches = iter(loader(StepBatches(train_examples, processor, dist, prompts, cfg),
                          range(start_step, cfg.train.max_steps), workers=cfg.data.num_workers,
                          prefetch=cfg.data.prefetch, seed=cfg.train.seed))
    for step in progress:
        laps = Laps(device)
        # 1. This rank's prompts of the step (global batch P, sharded by rank), collated by the
        # loader's workers ahead of the step (StepBatches). With data.skip_bad rows whose audio
        # does not decode are left out; a rank left with none runs a placeholder prompt whose rows
        # count nothing.
        batch = place_step_batch(next(batches), processor, dist)
        P = len(batch["references"])
        counted = 0 if batch["placeholder"] else P  # prompts whose rows count
        laps.lap("data")  # waiting for the batch: 0 when the workers keep ahead

        # 2. Rollout: G completions per prompt (MP-GRPO: G-1 plus the reference answer; SFT: the
        # reference answer alone).
        rollout = rollout_step(model, batch, cfg, method, tokenizer, step=step, rank=dist.rank)
        laps.lap("rollout")

        # 3. Rewards and group advantages (Eq. 1), over all G samples including the reference.
        # A per-token credit rule (span-level advantages, as in LEAF) would replace advantages_B
        # here by a (B, T) tensor aligned with rollout.mask_BT: policy_loss takes either.
        rewards_PG, advantages_B = group_rewards(rollout.texts, batch["references"], reward_fn, G, device,
                                                 scale=cfg.grpo.scale_rewards, real_prompts=counted)

        # 4. Micro-batches (as many on every rank), each with its loss mask, and the step's
        # normalisers counted once over all micro-batches and ranks (loss_denominators).
        plan = plan_step(rollout, advantages_B, cfg, method, counted=counted, device=device)
        laps.lap("reward")

        # 5. Old and reference log-probs, without gradient, reusing the rollout's audio embeddings
        # (micro_batch_logprobs says when they cannot be reused).
        logprobs = functools.partial(micro_batch_logprobs, batch=batch, rollout=rollout, group_size=G,
                                     temperature=method.temperature, chunk_size=cfg.model.logprob_chunk_size,
                                     shared_prefix=cfg.model.shared_prefix,
                                     reuse_audio=not audio_trainable(model))
        plan.old_lp, plan.ref_lp = frozen_logprobs(logprobs, model, ref_model, plan.micro,
                                                   old=method.passes > 1)
        laps.lap("logprobs")

        # 6. Loss and backward over micro-batches, `passes` times; clip and step each time.
        update = policy_update(model, params, optimizer, cfg, method, logprobs, plan, laps)
        scheduler.step()
        bad_streak = bad_streak + 1 if update.skipped else 0

        # 7. Log: raw sums reduced once across ranks, one namespaced dict per step.
        counts = rollout_counts(rewards_PG[:counted], rollout.mask_BT[:counted * G].sum(dim=1).float(),
                                max_new_tokens=cfg.grpo.max_new_tokens, skipped_rows=len(batch["skipped"]),
                                reference_column=method.reference_rows)
        totals = distributed.all_reduce_dict({**update.sums, **counts})
        laps.lap("log")
        logger.log(step_record(totals, step=step + 1, method=cfg.method, lr=scheduler.get_last_lr()[0],
                               grad_norm=float(update.grad_norm), skipped=update.skipped is not None,
                               times={**laps.times, "step": laps.total()})
                   | _memory(device) | stalls.update(totals, float(update.grad_norm), step + 1))
        if bad_streak >= cfg.train.max_bad_steps:
            logger.close()
            raise NonFiniteError(f"step {step + 1}: non-finite {update.skipped} in {bad_streak} steps in a row, "
                                 f"never applied or saved; stopping. {_ADVICE[update.skipped](cfg)} "
                                 f"(metrics: {run_dir}/metrics.jsonl)")
        if dist.is_main and method.samples and (step + 1) % cfg.train.rollouts_every == 0:
            dump_rollouts(run_dir, step + 1, batch, rollout.texts, rewards_PG[:counted], G)

        # 8. Validate, keep the best, checkpoint.
        last = step + 1 == cfg.train.max_steps
        if cfg.run.evaluate and ((step + 1) % cfg.train.eval_every == 0 or last):
            score = evaluate_split(model, processor, val_examples, cfg, dist, split="validation")[cfg.eval.metric]
            logger.log({"step": step + 1, f"val/{cfg.eval.metric}": score})
            distributed.print0(f"step {step + 1}: validation {cfg.eval.metric} {score:.2f} "
                               f"(best {best['score']:.2f} at step {best['step']})")
            if score > best["score"]:
                best = {"step": step + 1, "score": score}
                save_best(model, processor, run_dir / "best", dist, base["path"])
        # A stop request (signal) and a time-based save are decided together by every rank.
        stopping, timed = stop.agreed(time.monotonic() - last_save >= 60 * cfg.train.save_every_minutes > 0)
        if (step + 1) % cfg.train.save_every == 0 or last or stopping or timed:
            last_save = time.monotonic()
            checkpoint.save_checkpoint(ckpt_dir, step=step + 1, model=model, optimizer=optimizer,
                                       scheduler=scheduler, extra={"step": step + 1, "best": best, "base": base,
                                                                   **checkpoint.run_identity(cfg, prompts)})
        if stopping and not last:
            logger.close()
            stop.exit(step + 1, ckpt_dir, dist.is_main)
    logger.close()
    stop.restore()

    # 9. Test: the starting model and best/, all six metrics, as in the paper's tables.
    results = write_results(cfg, run_dir, dist, best) if cfg.run.evaluate else {}
    if dist.is_main:
        plot_run(run_dir, cfg)
    checkpoint.unlock_run_dir(run_dir)
    distributed.cleanup()
    return results


# Stage 0 ------------------------------------------------------------------------------------------

def build_models(cfg: Config, dist):
    """(policy, reference or None, processor, trainable parameter count, the base's identity),
    placed on the device."""
    model, processor = load_model(cfg.model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # set by load_model
    base = base_identity(model, cfg.model.path or str(default_base_path()))
    model.eval()  # dropout off: the policy that samples is the policy that is scored
    # The reference shares the policy's frozen parameters in one process (make_reference); placing
    # the policy first moves or shards them once, and the reference then takes its own shards.
    ref_model = make_reference(model) if Method.of(cfg).samples and cfg.grpo.beta > 0 else None
    model = place_model(model, cfg.model, dist)
    if ref_model is not None:
        ref_model = place_model(ref_model, cfg.model, dist)
    return model, ref_model, processor, n_trainable, base


def load_data(cfg: Config, dist, model, tokenizer, n_trainable: int):
    """(train examples whose prompts fit, validation examples, the run's Prompts). Prints the
    train prompts' length distribution and what each limit drops; writes the rendered prompt of
    the first example to run.dir/prompt.json."""
    if not dist.is_main:
        distributed.barrier()  # rank 0 synthesizes missing data first, the others then read it
    train_split = load_split(cfg, "train")
    val_split = load_split(cfg, "validation")
    if dist.is_main:
        distributed.barrier()
    prompts = run_prompts(cfg, tokenizer)
    lengths = prompt_lengths(train_split.examples, list(prompts.templates), tokenizer, prompts.system,
                             (model.config.window_size, model.config.downsample_rate))
    train_examples = [e for e, n in zip(train_split.examples, lengths) if n <= cfg.data.max_prompt_tokens]
    if lengths:
        ranked = sorted(lengths)
        distributed.print0(
            f"train prompts (tokens, audio included): median {ranked[len(ranked) // 2]}, "
            f"p95 {ranked[min(len(ranked) - 1, int(0.95 * len(ranked)))]}, max {ranked[-1]}; "
            f"over data.max_prompt_tokens={cfg.data.max_prompt_tokens}: {len(lengths) - len(train_examples)}; "
            f"skipped at load (data.max_audio_seconds={cfg.data.max_audio_seconds:g} and bad rows): "
            f"{train_split.skipped or 'none'}")
    if not train_examples:
        raise ValueError(f"no usable train examples for task {cfg.task} in {cfg.data.source} data")
    first = train_examples[0]
    prompts = dataclasses.replace(prompts, rendered=chat_prompt(
        tokenizer, format_prompt(prompts.templates[0], first["prompt_fields"]), prompts.system))
    if dist.is_main:
        record = {"system_prompt": prompts.system, "instructions": list(prompts.templates),
                  "first_example": first["id"], "rendered": prompts.rendered}
        Path(cfg.run.dir, "prompt.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    distributed.print0(f"{cfg.method} on {cfg.task}: {len(train_examples)} train / "
                       f"{len(val_split.examples)} validation examples "
                       f"(skipped: {train_split.skipped}), {n_trainable:,} trainable parameters, "
                       f"{dist.world_size} rank(s)")
    return train_examples, val_split.examples, prompts


def start_state(cfg: Config, dist, model, optimizer, scheduler, prompts: Prompts, base: dict) -> tuple[int, dict]:
    """(first step, best validation so far): from the newest checkpoint that loads and belongs to
    this run when resuming (a damaged newest checkpoint is passed over for the one before it, and
    another run's are refused), else step 0 with a fresh metrics.jsonl."""
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    extra = checkpoint.load_latest_intact(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                          cfg=cfg, prompts=prompts, base=base) if cfg.resume else None
    if extra is not None:
        if dist.is_main:
            truncate_log(run_dir / "metrics.jsonl", extra["step"])
        distributed.print0(f"resumed from {extra['path']} at step {extra['step']}")
        return extra["step"], extra["best"]
    if cfg.resume:
        distributed.print0(f"resume=true but no checkpoint in {ckpt_dir}: starting from step 0")
    if dist.is_main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    return 0, {"step": -1, "score": -1.0}


# Stages 1-6 ---------------------------------------------------------------------------------------

class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's prompt batch of that step, collated on the CPU (collate_step). It is
    a pure function of the step and the seed (example order: step_indices; prompt wordings: a
    generator seeded by the step), so the loader's workers can build batches ahead of the loop
    and a resumed run gets the batches it would have had."""

    def __init__(self, examples: list[dict], processor, dist, prompts: Prompts, cfg: Config):
        self.examples, self.processor, self.dist, self.prompts = examples, processor, dist, prompts
        self.seed, self.P, self.skip_bad = cfg.train.seed, cfg.train.prompts_per_step, cfg.data.skip_bad

    def __len__(self) -> int:
        return 2 ** 62  # any step: the sampler says which

    def __getitem__(self, step: int) -> dict:
        global_idx = step_indices(step, len(self.examples), self.P, self.seed)
        return collate_step([self.examples[i] for i in global_idx], self.processor, self.dist,
                            self.prompts, rng=random.Random(distributed.step_seed(self.seed, "prompt-wording", step)),
                            skip_bad=self.skip_bad)


def prompt_batch(step_examples: list[dict], processor, dist, prompts: Prompts, *,
                 rng: random.Random, skip_bad: bool, group_size: int = 1) -> dict:
    """This rank's share of the step's examples, collated on its device, with `placeholder`:
    collate_step, then place_step_batch."""
    return place_step_batch(collate_step(step_examples, processor, dist, prompts, rng=rng,
                                         skip_bad=skip_bad), processor, dist)


def collate_step(step_examples: list[dict], processor, dist, prompts: Prompts, *,
                 rng: random.Random, skip_bad: bool) -> dict:
    """This rank's share of the step's examples, collated on the CPU, with `placeholder`,
    `positions` and `step_examples`: no collective, so a DataLoader worker can build it.

    With skip_bad a rank whose every clip fails to decode still has to run the step's collective
    passes (rollout, log-probs, backward): it takes the first prompt of the whole step that decodes
    as a placeholder (placeholder=True), whose rows the loop counts as no tokens and no metrics."""
    # Each example's wording is drawn for the whole step in order, whatever the number of ranks:
    # 1 process and N ranks give every prompt the same text.
    chosen = [rng.choice(prompts.templates) for _ in step_examples]
    mine = step_examples[dist.rank::dist.world_size]
    try:
        batch = collate(mine, processor, chosen=chosen[dist.rank::dist.world_size],
                        templates=list(prompts.templates), system=prompts.system, skip_bad=skip_bad,
                        with_waves=True)
        batch["placeholder"] = False
    except DataError:
        if not skip_bad:
            raise
        batch = None
        for ex in step_examples:
            try:
                batch = collate([ex], processor, rng=random.Random(0), templates=list(prompts.templates),
                                system=prompts.system, skip_bad=True, with_waves=True)
                break
            except DataError:
                continue
        if batch is None:
            raise
        batch["skipped"] = [ex.get("where") or ex["id"] for ex in mine]
        batch["placeholder"] = True
    # Where the kept prompts sit in the step (r, r+W, ... minus skipped ones): their sampling noise
    # and off-policy draws are keyed by that position.
    positions = list(range(dist.rank, len(step_examples), dist.world_size))
    kept = iter(batch["ids"])
    want = next(kept, None)
    batch["positions"] = []
    for pos in positions:
        if not batch["placeholder"] and step_examples[pos]["id"] == want:
            batch["positions"].append(pos)
            want = next(kept, None)
    if batch["placeholder"]:
        batch["positions"] = [0]
    batch["step_examples"] = step_examples
    return batch


def place_step_batch(batch: dict, processor, dist) -> dict:
    """A collated step batch (collate_step) ready for the step, in the training process: its audio
    features padded to the step's longest clip over all ranks (collate.pad_audio; a collective),
    then on the rank's device."""
    batch = pad_audio(batch, processor, distributed.all_reduce_max(batch["audio_samples"]))
    return to_device(batch, dist.device)


def rollout_step(model, batch: dict, cfg: Config, method: Method, tokenizer, *, step: int, rank: int) -> Rollout:
    """The step's completions. GRPO: G samples per prompt; MP-GRPO: G-1 samples and the reference
    answer; SFT: the reference answer as the one completion of each prompt."""
    device = batch["input_ids"].device
    references = batch["references"]
    G = method.group_size
    if not method.samples:
        with torch.no_grad():
            audio_embeds = encode_audio(model, batch)
        ids_BT, mask_BT = (x.to(device) for x in tokenize_targets(references, tokenizer, cfg.grpo.max_new_tokens))
        return Rollout(ids_BT, mask_BT, torch.zeros(mask_BT.shape, device=device), references,
                       torch.zeros(len(references), dtype=torch.bool, device=device), audio_embeds,
                       decode_path="reference answers")
    # One stream per step for every rank; each rank keeps the rows of its prompts (rank-count
    # invariant sampling: rollout._race_noise).
    gen = torch.Generator(device).manual_seed(distributed.step_seed(cfg.train.seed, "rollout", step))
    rows_B = torch.tensor([p * G + g for p in batch["positions"] for g in range(G)], dtype=torch.long)
    rollout = sample_groups(model, batch, group_size=G, max_new_tokens=cfg.grpo.max_new_tokens,
                            temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, tokenizer=tokenizer,
                            generator=gen, min_new_tokens=cfg.grpo.min_new_tokens,
                            noise_rows=(rows_B, len(batch["step_examples"]) * G), cuda_graphs=cfg.model.cuda_graphs)
    if method.reference_rows:
        rollout = add_reference_samples(rollout, off_policy_answers(batch, cfg, step=step, rank=rank),
                                        tokenizer, group_size=G, max_new_tokens=cfg.grpo.max_new_tokens)
    return rollout


def off_policy_answers(batch: dict, cfg: Config, *, step: int, rank: int) -> list[list[str]]:
    """MP-GRPO's off-policy rows per prompt: the reference, then k-1 of its other correct answers
    drawn without replacement for this step (as many as there are, when fewer). The draws are made
    for every prompt of the step in order, whatever the number of ranks (`rank` does not enter)."""
    rng = random.Random(distributed.step_seed(cfg.train.seed, "off-policy", step))
    k = cfg.grpo.off_policy_rows
    # The step's examples in order (prompt_batch); a batch on its own is the whole step.
    examples = batch.get("step_examples") or [{"reference": r, "alternatives": a}
                                              for r, a in zip(batch["references"], batch["alternatives"])]
    drawn = [[ex["reference"]] + rng.sample(list(ex.get("alternatives", ())), min(k - 1, len(ex.get("alternatives", ()))))
             for ex in examples]
    return [drawn[pos] for pos in batch.get("positions", range(len(examples)))]


def group_rewards(texts: list[str], references: list[str], reward_fn, G: int, device, *, scale: str = "group",
                  real_prompts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (P, G), advantages (P*G,)); row p*G+g is scored against prompt p's reference.
    SFT (no reward_fn): zeros. scale: grpo.scale_rewards; with batch every rank must call this (the
    std is reduced over ranks) and only the first `real_prompts` prompts (None: all) count in it,
    so a placeholder prompt does not."""
    P = len(references)
    if reward_fn is None:
        return torch.zeros(P, 1, device=device), torch.zeros(P, device=device)
    refs_B = [r for r in references for _ in range(G)]
    rewards_PG = reward_fn(texts, refs_B).view(P, G).to(device)
    batch_std = reward_std(rewards_PG[:real_prompts]) if scale == "batch" else None
    return rewards_PG, group_advantages(rewards_PG, scale=scale, batch_std=batch_std).flatten()


def reward_std(rewards: torch.Tensor) -> float:
    """The unbiased std of the step's rewards over all ranks (scale_rewards=batch): the global mean
    first, then the squared deviations from it, both summed over ranks in float64."""
    r = rewards.detach().double().flatten()
    n, total = distributed.all_reduce_sum(torch.stack([r.new_tensor(float(r.numel())), r.sum()])).tolist()
    mean = total / max(n, 1.0)
    squares = float(distributed.all_reduce_sum(((r - mean) ** 2).sum()))
    return math.sqrt(squares / (n - 1)) if n > 1 else 0.0


def loss_options(g: GRPOConfig) -> dict:
    """policy_loss's parameters for grpo.loss_type, grpo.importance_sampling and the clip ranges
    (config.py documents each value); the loss_type's normaliser is loss_denominators'."""
    return {"eps_low": g.eps_low, "eps_high": g.eps_high, "beta": g.beta, "delta": g.delta,
            "sequence_ratio": g.importance_sampling == "sequence", "truncated_is": g.loss_type == "cispo",
            "row_mean": g.loss_type == "grpo"}


def loss_denominators(loss_type: str, mask_BT: torch.Tensor, micro, *, num_tokens: float,
                      max_new_tokens: int) -> list[float]:
    """What divides each micro-batch's summed loss (one per micro-batch of rank_micro_batches), counted
    once per optimiser step over all micro-batches and ranks, so that the gradients summed over
    them are those of the whole step:
      dapo, cispo  num_tokens, the step's completion tokens (Eq. 3);
      grpo         the step's completions (rows with a token): policy_loss takes each row's token
                   mean first (row_mean);
      dr_grpo      the step's completions x max_new_tokens, a constant per token;
      bnpo         the micro-batch's own tokens x the step's micro-batches that hold tokens (over
                   all ranks): the mean of per-micro-batch token means, as accumulating steps and
                   averaging ranks give it in TRL. Not invariant to how the step is split, by
                   definition.
    Every rank must call this (the counts are all-reduced). mask_BT: the step's loss mask; micro:
    (rows, mask) from rank_micro_batches. A micro-batch whose mask is all zero (a rank's repeated
    last micro-batch) holds no tokens and gets 1."""
    if loss_type in ("dapo", "cispo"):
        return [num_tokens] * len(micro)
    if loss_type in ("grpo", "dr_grpo"):
        rows = distributed.all_reduce_sum((mask_BT.sum(dim=1) > 0).sum().double()).item()
        return [rows * (max_new_tokens if loss_type == "dr_grpo" else 1)] * len(micro)
    if loss_type == "bnpo":
        tokens = [float(mask.sum()) for _, mask in micro]
        n = distributed.all_reduce_sum(float(sum(t > 0 for t in tokens)))
        return [max(t, 1.0) * n for t in tokens]
    raise ValueError(f"unknown loss_type {loss_type!r}")


def plan_step(rollout: Rollout, advantages_B: torch.Tensor, cfg: Config, method: Method, *, counted: int,
              device) -> StepPlan:
    """The step's micro-batches with their loss masks and its normalisers: the loss mask is the
    rollout's, zeroed once here when no prompt of this rank counts (a placeholder), and each
    normaliser is counted once over all micro-batches and ranks (every rank must call this)."""
    mask_BT = rollout.mask_BT if counted else torch.zeros_like(rollout.mask_BT)
    num_tokens = distributed.all_reduce_sum(mask_BT.sum().float()).item()
    G = method.group_size
    micro = rank_micro_batches(mask_BT, rollout.mask_BT.shape[0] // G, G, cfg.train.micro_batch_size, device)
    denominators = loss_denominators(cfg.grpo.loss_type if method.samples else "dapo", mask_BT, micro,
                                     num_tokens=num_tokens, max_new_tokens=cfg.grpo.max_new_tokens)
    return StepPlan(micro, advantages_B, rollout.off_policy_B, num_tokens, denominators)


def micro_batch_logprobs(net, rows_B: torch.Tensor, *, batch: dict, rollout: Rollout, group_size: int,
                   temperature: float, chunk_size: int, shared_prefix: bool, reuse_audio: bool) -> torch.Tensor:
    """(b, T) log-probs under `net` of the rollout rows `rows_B` (one micro-batch).

    reuse_audio: hand the rollout's audio embeddings to the pass. The loop sets it to "encoder
    and projector are frozen", the one case in which the reference's embeddings are the policy's;
    sequence_logprobs then encodes afresh only a pass that needs the audio gradient."""
    return sequence_logprobs(net, batch, rollout.audio_embeds if reuse_audio else None,
                             rollout.completion_ids_BT[rows_B], rollout.mask_BT[rows_B],
                             group_size=group_size, rows_B=rows_B, temperature=temperature,
                             chunk_size=chunk_size, shared_prefix=shared_prefix)


@torch.no_grad()
def frozen_logprobs(logprobs, model, ref_model, micro, *, old: bool):
    """({micro-batch: old log-probs}, {micro-batch: reference log-probs}). Old ones only when the
    step makes more than one pass (on the first pass the policy is the sampling policy, s = 1)."""
    old_lp, ref_lp = {}, {}
    for i, (rows, _) in enumerate(micro):
        if old:
            old_lp[i] = logprobs(model, rows)
        if ref_model is not None:
            ref_lp[i] = logprobs(ref_model, rows)
    return old_lp, ref_lp


@dataclasses.dataclass
class Update:
    """What policy_update did in one step."""
    sums: dict[str, float]
    """Raw metric sums over micro-batches and passes (loss_sum = loss x num_tokens included)."""
    grad_norm: torch.Tensor
    """The last pass's gradient norm before clipping."""
    skipped: str | None
    """The first non-finite quantity (one of NONFINITE) of a pass that was not applied, or None."""


def micro_batch_loss(lp_BT, i: int, mask_bT, rows, plan: StepPlan, method: Method, cfg: Config):
    """(loss, raw metrics) of micro-batch i: SFT's token NLL or the policy loss, divided by the
    micro-batch's denominator."""
    if not method.samples:
        return sft_loss(lp_BT, mask_bT, num_tokens=plan.denominators[i])
    old_BT = plan.old_lp[i] if i in plan.old_lp else lp_BT.detach()
    return policy_loss(lp_BT, old_BT, plan.ref_lp.get(i), plan.advantages_B[rows], mask_bT,
                       off_policy_B=plan.off_policy_B[rows], denominator=plan.denominators[i],
                       **loss_options(cfg.grpo))


def policy_update(model, params, optimizer, cfg: Config, method: Method, logprobs, plan: StepPlan,
                  laps: Laps) -> Update:
    """`method.passes` times: loss and backward over the micro-batches, clip, optimiser step. A
    pass whose loss or gradient is not finite on any rank zeroes the gradients and ends the step.
    loss_sum = loss x num_tokens whatever divided it, so loss/total (loss_sum over the tokens) is
    the step's loss, summed over micro-batches and ranks and averaged over passes. Charges the
    passes to laps "train" and the clip and step to "optimizer"."""
    sums: dict[str, float] = {}
    grad_norm, skipped = torch.tensor(0.0), None
    for _ in range(method.passes):
        optimizer.zero_grad(set_to_none=True)
        bad: str | None = None  # the first non-finite quantity of this pass on this rank
        for i, (rows, mask_bT) in enumerate(plan.micro):
            with recompute_layers(model, cfg.model.gradient_checkpointing):
                lp_BT = logprobs(model, rows)
            loss, m = micro_batch_loss(lp_BT, i, mask_bT, rows, plan, method, cfg)
            bad = bad or _first_nonfinite(lp_BT, mask_bT, loss, m)
            loss.backward()
            m["loss_sum"] = loss.detach() * plan.num_tokens
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        laps.lap("train")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if bad is None and not torch.isfinite(grad_norm):
            bad = "gradient"
        # Every rank learns the first bad quantity of any rank (a one-hot sum in NONFINITE order).
        seen = distributed.all_reduce_sum(torch.tensor([float(bad == q) for q in NONFINITE]))
        if seen.sum() > 0:
            optimizer.zero_grad(set_to_none=True)
            skipped = NONFINITE[int(seen.nonzero()[0])]
            laps.lap("optimizer")
            break
        optimizer.step()
        laps.lap("optimizer")
    return Update(sums, grad_norm, skipped)


class Stalls:
    """Counts steps in a row that cannot change the model: every group's advantages 0 (all its
    rewards equal) or a zero gradient norm. From `limit` on, each such step's record carries
    warn/stalled = 1, and the first one prints a warning line."""

    def __init__(self, limit: int, *, grpo: bool):
        self.limit, self.grpo, self.zero_adv, self.zero_grad = limit, grpo, 0, 0

    def update(self, tot: dict, grad_norm: float, step: int) -> dict:
        flat = self.grpo and tot.get("groups", 0) > 0 and tot.get("zero_std_groups", 0) == tot["groups"]
        self.zero_adv = self.zero_adv + 1 if flat else 0
        self.zero_grad = self.zero_grad + 1 if grad_norm == 0 else 0
        n = max(self.zero_adv, self.zero_grad)
        if n < self.limit:
            return {}
        if n == self.limit:
            why = ("every advantage was 0 (each group's rewards all equal)" if self.zero_adv >= self.limit
                   else "the gradient norm was 0")
            distributed.print0(f"warning: step {step}: for {n} steps in a row {why}: the model is not "
                               "learning (check grpo.temperature, the reward, train.lr)")
        return {"warn/stalled": 1}


# What can turn non-finite in a step, in the order it is computed, and what to do about each.
NONFINITE = ("log-probs", "ratio", "KL", "loss", "gradient")
_ADVICE = {
    "log-probs": lambda cfg: "The model's outputs overflowed: lower train.lr"
                             + (" or compute in float32 (model.dtype)" if cfg.model.dtype != "float32" else "") + ".",
    "ratio": lambda cfg: "The policy moved too far within one rollout batch: lower train.lr or grpo.num_iterations.",
    "KL": lambda cfg: "The policy moved too far from the reference: lower train.lr.",
    "loss": lambda cfg: "Lower train.lr" + (f" or grpo.beta ({cfg.grpo.beta:g})" if cfg.grpo.beta > 1 else "") + ".",
    "gradient": lambda cfg: "Lower train.lr"
                            + (" or compute in float32 (model.dtype)" if cfg.model.dtype != "float32" else "") + ".",
}


class NonFiniteError(UserError):
    """A run stopped because its steps kept turning non-finite (one line on the command line)."""


def _first_nonfinite(lp_BT, mask_BT, loss, m: dict) -> str | None:
    """The first of NONFINITE (not the gradient) that is not finite in one micro-batch."""
    checks = (("log-probs", torch.where(mask_BT.bool(), lp_BT.detach(), 0.0)),
              ("ratio", m.get("ratio_sum", 0.0)), ("KL", m.get("kl_sum", 0.0)), ("loss", loss.detach()))
    return next((name for name, x in checks if not bool(torch.isfinite(torch.as_tensor(x)).all())), None)


# Exit code of a run stopped by a signal after writing its checkpoint (sysexits' EX_TEMPFAIL:
# try again later). A requeue script resumes the run on it (run.resume=auto).
EXIT_REQUEUE = 75


class StopRequests:
    """SIGTERM, SIGUSR1 (run.stop_signals) and Ctrl-C ask the run to stop after its current step
    with a checkpoint; a second one exits at once. The handler only sets a flag: ranks agree on
    stopping at the end of a step (`agreed`), so every rank saves the same step."""

    def __init__(self, names: str):
        import signal
        self.requested = 0
        self.signals = [getattr(signal, "SIG" + n.strip()) for n in names.split(",") if n.strip()]
        self.signals.append(signal.SIGINT)
        self.previous = {}
        for sig in set(self.signals):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass

    def _handle(self, signum, frame):
        import signal
        name = signal.Signals(signum).name
        loud = distributed.rank_world()[0] == 0  # torchrun signals every rank: one line per job
        if self.requested:
            if loud:
                print(f"\n{name} again: exiting now (the newest checkpoint is intact)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = signum
        if loud:
            print(f"\n{name}: stopping after this step with a checkpoint (send it again to exit at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, save_due: bool) -> tuple[bool, bool]:
        """(stop now, save now) as every rank sees them: a request on any rank stops all."""
        flags = distributed.all_reduce_sum(torch.tensor([float(self.requested > 0), float(save_due)]))
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def exit(self, step: int, ckpt_dir: Path, is_main: bool) -> None:
        if is_main:  # what a requeue script tests (recipes/slurm)
            (ckpt_dir.parent / "stopped.json").write_text(json.dumps({"step": step, "exit_code": EXIT_REQUEUE}) + "\n")
        distributed.print0(f"stopped at step {step} on request; checkpoint in {ckpt_dir}; exit code "
                           f"{EXIT_REQUEUE}: resume with `train --resume {ckpt_dir.parent}` or run.resume=auto")
        self.restore()
        checkpoint.unlock_run_dir(ckpt_dir.parent)
        distributed.cleanup()
        raise SystemExit(EXIT_REQUEUE)

    def restore(self) -> None:
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {}
