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

import json
import math
import random
import time
from pathlib import Path

import torch

from grpo_speech import checkpoint, distributed
from grpo_speech.config import Config
from grpo_speech.data import collate, load_split, templates_for
from grpo_speech.data.collate import to_device
from grpo_speech.data.audio import SAMPLE_RATE
from grpo_speech.data.collate import audio_token_count
from grpo_speech.data.prompts import format_prompt
from grpo_speech.evaluate import evaluate_split, plot_run, write_results
from grpo_speech.loss import dapo_loss, group_advantages, sft_loss
from grpo_speech.model import load_model, make_reference, place_model, recompute_layers, save_model
from grpo_speech.rewards import get_reward
from grpo_speech.rollout import (
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
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(order[i]))
    return out


def micro_batches(n_prompts: int, group_size: int, micro_batch_size: int) -> list[list[int]]:
    """Prompt indices per micro-batch: whole groups, about `micro_batch_size` rows each."""
    per = max(1, micro_batch_size // group_size)
    return [list(range(i, min(i + per, n_prompts))) for i in range(0, n_prompts, per)]


def rows_of(prompt_idx: list[int], group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows p*G+g of the prompts in `prompt_idx` (row p*G+g belongs to prompt p)."""
    return torch.tensor([p * group_size + g for p in prompt_idx for g in range(group_size)], device=device)


def train(cfg: Config) -> dict:
    dist = distributed.init_distributed()
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    G = 1 if cfg.method == "sft" else cfg.grpo.group_size
    if cfg.train.prompts_per_step % dist.world_size:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of "
                         f"the number of ranks ({dist.world_size})")
    if cfg.method == "mpgrpo" and G < 2:
        raise ValueError("method=mpgrpo needs grpo.group_size >= 2 (G-1 samples plus the reference)")
    checkpoint.prepare_run_dir(cfg, is_main=dist.is_main)  # one run per run.dir (issue 15)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    # 0. Model, frozen reference, optimiser, data, reward.
    model, processor = load_model(cfg.model)
    tokenizer = processor.tokenizer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # set by load_model
    model.eval()  # dropout off: the policy that samples is the policy that is scored
    # The reference shares the policy's frozen parameters in one process (make_reference); placing
    # the policy first moves or shards them once, and the reference then takes its own shards.
    ref_model = make_reference(model) if cfg.method != "sft" and cfg.grpo.beta > 0 else None
    model = place_model(model, cfg.model, dist)
    if ref_model is not None:
        ref_model = place_model(ref_model, cfg.model, dist)
    device = dist.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.train.max_steps, cfg.train.warmup_ratio))
    reward_fn = get_reward(cfg.grpo.reward) if cfg.method != "sft" else None
    if not dist.is_main:
        distributed.barrier()  # rank 0 synthesizes missing data first, the others then read it
    train_split = load_split(cfg, "train")
    val_split = load_split(cfg, "validation")
    if dist.is_main:
        distributed.barrier()
    templates = templates_for(cfg.task)
    train_examples = _fitting(train_split.examples, templates, tokenizer, cfg.data.max_prompt_tokens,
                              (model.config.window_size, model.config.downsample_rate))
    too_long = len(train_split.examples) - len(train_examples)
    if too_long:
        distributed.print0(f"skipped {too_long} train examples whose prompt exceeds "
                           f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} tokens")
    if not train_examples:
        raise ValueError(f"no usable train examples for task {cfg.task} in {cfg.data.source} data")
    distributed.print0(f"{cfg.method} on {cfg.task}: {len(train_examples)} train / "
                       f"{len(val_split.examples)} validation examples "
                       f"(skipped: {train_split.skipped}), {n_trainable:,} trainable parameters, "
                       f"{dist.world_size} rank(s)")

    start_step, best = 0, {"step": -1, "score": -1.0}
    # The newest checkpoint that loads and belongs to this run (issue 15).
    extra = checkpoint.load_latest_intact(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                          cfg=cfg) if cfg.resume else None
    if extra is not None:
        start_step, best = extra["step"], extra["best"]
        if dist.is_main:
            _truncate_log(run_dir / "metrics.jsonl", start_step)
        distributed.print0(f"resumed from {extra['path']} at step {start_step}")
    elif cfg.resume:
        distributed.print0(f"resume=true but no checkpoint in {ckpt_dir}: starting from step 0")

    # The starting model's validation score is the first point of the curve and the bar to beat.
    if start_step == 0 and dist.is_main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    if start_step == 0 and cfg.run.evaluate:
        base_val = evaluate_split(model, processor, val_split.examples, cfg, dist, split="validation")
        best = {"step": 0, "score": base_val[cfg.eval.metric]}
        _save_best(model, processor, run_dir, dist)
        _log(run_dir, dist, {"step": 0, f"val/{cfg.eval.metric}": base_val[cfg.eval.metric]})

    # Log-probs are scored at the sampling temperature (greedy rollouts and SFT targets at 1).
    lp_temperature = 1.0 if cfg.method == "sft" else (cfg.grpo.temperature or 1.0)
    bad_streak = 0
    progress = distributed.progress(range(start_step, cfg.train.max_steps), dist, desc=cfg.method)
    for step in progress:
        t0 = time.perf_counter()
        # 1. This rank's prompts of the step (global batch P, sharded by rank).
        global_idx = step_indices(step, len(train_examples), cfg.train.prompts_per_step, cfg.train.seed)
        local_idx = global_idx[dist.rank::dist.world_size]
        examples = [train_examples[i] for i in local_idx]
        rng = random.Random(cfg.train.seed * 1_000_003 + step)
        batch = to_device(collate(examples, processor, rng=rng, templates=templates, skip_bad=cfg.data.skip_bad),
                          device)
        references = batch["references"]
        P = len(references)  # with data.skip_bad, rows whose audio does not decode are left out

        # 2. Rollout: G completions per prompt (MP-GRPO: G-1 plus the reference answer).
        if cfg.method == "sft":
            with torch.no_grad():
                audio_embeds = distributed.through_root(model, encode_audio, model, batch)
            ids_BT, mask_BT = (x.to(device) for x in tokenize_targets(references, tokenizer, cfg.grpo.max_new_tokens))
            off_policy_B = torch.zeros(P, dtype=torch.bool, device=device)
            texts = references
        else:
            gen = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + step * 97 + dist.rank)
            rollout = distributed.through_root(
                model, sample_groups, model, batch, group_size=G, max_new_tokens=cfg.grpo.max_new_tokens,
                temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, tokenizer=tokenizer, generator=gen,
                min_new_tokens=cfg.grpo.min_new_tokens)
            if cfg.method == "mpgrpo":
                rollout = add_reference_samples(rollout, references, tokenizer, group_size=G,
                                                max_new_tokens=cfg.grpo.max_new_tokens)
            audio_embeds = rollout.audio_embeds
            ids_BT, mask_BT = rollout.completion_ids_BT, rollout.mask_BT
            off_policy_B, texts = rollout.off_policy_B, rollout.texts
        t_rollout = time.perf_counter() - t0

        # 3. Rewards and group advantages (Eq. 1), over all G samples including the reference.
        if cfg.method == "sft":
            rewards_PG = torch.zeros(P, 1, device=device)
            advantages_B = torch.zeros(P, device=device)
        else:
            refs_B = [r for r in references for _ in range(G)]  # row p*G+g scores against prompt p
            rewards_PG = reward_fn(texts, refs_B).view(P, G).to(device)
            advantages_B = group_advantages(rewards_PG).flatten()

        # 4. Global token count (all micro-batches, all ranks): the loss of each micro-batch is
        # divided by it so that the summed gradient is the token mean of the whole step (DAPO).
        num_tokens = distributed.all_reduce_sum(mask_BT.sum().float()).item()
        chunks = micro_batches(P, G, cfg.train.micro_batch_size)

        t_lp = _clock(device)
        # 5. Old and reference log-probs, without gradient, reusing the audio embeddings.
        # The rollout's audio embeddings serve every pass of the policy; the reference encodes
        # its own when the encoder or projector train (they differ from the policy's then).
        own_audio = audio_trainable(model)

        def logprobs(net, prompt_idx):
            rows = rows_of(prompt_idx, G, device)
            embeds = None if (net is ref_model and own_audio) else audio_embeds
            return distributed.through_root(
                net, sequence_logprobs, net, batch, embeds, ids_BT[rows], mask_BT[rows],
                group_size=G, rows_B=rows, temperature=lp_temperature,
                chunk_size=cfg.model.logprob_chunk_size)

        old_lp, ref_lp = {}, {}
        with torch.no_grad():
            for i, idx in enumerate(chunks):
                if cfg.method != "sft" and cfg.grpo.num_iterations > 1:
                    old_lp[i] = logprobs(model, idx)
                if ref_model is not None:
                    ref_lp[i] = logprobs(ref_model, idx)

        # 6. Loss and backward over micro-batches, `num_iterations` passes; clip and step.
        t1, t_opt = time.perf_counter(), 0.0
        sums: dict[str, float] = {}
        grad_norm = torch.tensor(0.0)
        skipped = False
        for _ in range(_passes(cfg)):
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for i, idx in enumerate(chunks):
                rows = rows_of(idx, G, device)
                with recompute_layers(model, cfg.model.gradient_checkpointing):
                    lp_BT = logprobs(model, idx)
                if cfg.method == "sft":
                    loss, m = sft_loss(lp_BT, mask_BT[rows], num_tokens=num_tokens)
                else:
                    old_BT = old_lp[i] if i in old_lp else lp_BT.detach()
                    loss, m = dapo_loss(lp_BT, old_BT, ref_lp.get(i), advantages_B[rows], mask_BT[rows],
                                        off_policy_B=off_policy_B[rows], eps_low=cfg.grpo.eps_low,
                                        eps_high=cfg.grpo.eps_high, beta=cfg.grpo.beta,
                                        num_tokens=num_tokens)
                finite &= bool(torch.isfinite(loss))
                loss.backward()
                m["loss_sum"] = loss.detach() * num_tokens
                for k, v in m.items():
                    if not k.endswith(("_frac", "_mean")):
                        sums[k] = sums.get(k, 0.0) + float(v)
            t_opt0 = _clock(device)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            finite = distributed.all_reduce_sum(torch.tensor(0.0 if finite else 1.0)).item() == 0
            if not finite or not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            optimizer.step()
            t_opt += _clock(device) - t_opt0
        scheduler.step()
        bad_streak = bad_streak + 1 if skipped else 0
        if bad_streak >= cfg.train.max_bad_steps:
            raise RuntimeError(f"step {step}: {bad_streak} non-finite steps in a row (loss or gradient); "
                               f"stopping. Lower train.lr or raise grpo.beta; see {run_dir}/metrics.jsonl")
        t_train = time.perf_counter() - t1
        t_logprobs = _clock(device) - t_lp - t_opt

        # 7. Log: reduce sums once across ranks, one namespaced dict per step.
        lens_B = mask_BT.sum(dim=1).float()
        local = dict(sums, reward_sum=float(rewards_PG.sum()), reward_sq=float((rewards_PG ** 2).sum()),
                     reward_n=float(rewards_PG.numel()), len_sum=float(lens_B.sum()),
                     len_n=float(lens_B.numel()), zero_std=float(_zero_std_groups(rewards_PG)),
                     groups=float(P), trunc=float((lens_B >= cfg.grpo.max_new_tokens).sum()),
                     skipped_rows=float(len(batch["skipped"])))
        tot = distributed.all_reduce_dict(local)
        passes = max(1, _passes(cfg))
        n = max(tot.get("tokens", 0.0), 1.0)
        r_mean = tot["reward_sum"] / tot["reward_n"]
        record = {
            "step": step + 1,
            "loss/total": tot.get("loss_sum", 0.0) / n,
            "optim/lr": scheduler.get_last_lr()[0],
            "optim/grad_norm": float(grad_norm),
            "optim/skipped": int(skipped),
            "data/skipped_rows": int(tot["skipped_rows"]),
            "rollout/len_mean": tot["len_sum"] / tot["len_n"],
            "rollout/truncated_frac": tot["trunc"] / tot["len_n"],
            "time/rollout": t_rollout,
            "time/train": t_train,
            "time/logprobs": t_logprobs,
            "time/optimizer": t_opt,
            "time/step": time.perf_counter() - t0,
        }
        if device.type == "cuda":
            record["mem/peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if cfg.method == "sft":
            record["loss/nll"] = tot["nll_sum"] / n
        else:
            on = max(tot["on_policy_tokens"], 1.0)
            record.update({
                "loss/pg": -tot["pg_sum"] / n,
                "loss/kl": tot["kl_sum"] / n,
                "reward/mean": r_mean,
                "reward/std": math.sqrt(max(0.0, tot["reward_sq"] / tot["reward_n"] - r_mean ** 2)),
                "adv/zero_std_frac": tot["zero_std"] / tot["groups"],
                "clip/low_frac": tot["clip_low_count"] / on,
                "clip/high_frac": tot["clip_high_count"] / on,
                "clip/frac": (tot["clip_low_count"] + tot["clip_high_count"]) / on,
                "ratio/mean": tot["ratio_sum"] / on,
            })
            if cfg.method == "mpgrpo":
                record["reward/reference_mean"] = float(rewards_PG[:, -1].mean())
        record = {k: (v / passes if k.startswith(("loss/", "clip/", "ratio/")) else v)
                  for k, v in record.items()}
        _log(run_dir, dist, record)
        if dist.is_main and (step + 1) % cfg.train.log_every == 0:
            progress.set_postfix_str(_summary(record))
        if dist.is_main and cfg.method != "sft" and (step + 1) % cfg.train.rollouts_every == 0:
            _dump_rollouts(run_dir, step + 1, batch, texts, rewards_PG, G)

        # 8. Validate, keep the best, checkpoint.
        last = step + 1 == cfg.train.max_steps
        if cfg.run.evaluate and ((step + 1) % cfg.train.eval_every == 0 or last):
            val = evaluate_split(model, processor, val_split.examples, cfg, dist, split="validation")
            score = val[cfg.eval.metric]
            _log(run_dir, dist, {"step": step + 1, f"val/{cfg.eval.metric}": score})
            distributed.print0(f"step {step + 1}: validation {cfg.eval.metric} {score:.2f} "
                               f"(best {best['score']:.2f} at step {best['step']})")
            if score > best["score"]:
                best = {"step": step + 1, "score": score}
                _save_best(model, processor, run_dir, dist)
        if (step + 1) % cfg.train.save_every == 0 or last:
            checkpoint.save_checkpoint(ckpt_dir, step=step + 1, model=model, optimizer=optimizer,
                                       scheduler=scheduler, extra={"step": step + 1, "best": best,
                                                                   **checkpoint.run_identity(cfg)})

    # 9. Test: the starting model and best/, all six metrics, as in the paper's tables.
    results = write_results(cfg, run_dir, dist, best) if cfg.run.evaluate else {}
    if dist.is_main:
        plot_run(run_dir, cfg)
    distributed.cleanup()
    return results


def _fitting(examples: list[dict], templates: list[str], tokenizer, max_tokens: int,
             projector: tuple[int, int] = (15, 5)) -> list[dict]:
    """Examples whose longest possible prompt (audio positions + template + chat markers) fits
    in `max_tokens` (paper: prompts <= 256 tokens). projector: its (window, downsample)."""
    def length(example):
        n_audio = audio_token_count(round(example["seconds"] * SAMPLE_RATE), *projector)
        texts = [format_prompt(t, example["prompt_fields"]) for t in templates]
        chat = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts]
        return n_audio - 1 + max(len(tokenizer(c, add_special_tokens=False).input_ids) for c in chat)
    return [e for e in examples if length(e) <= max_tokens]


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _passes(cfg: Config) -> int:
    return 1 if cfg.method == "sft" else cfg.grpo.num_iterations


def _zero_std_groups(rewards_PG: torch.Tensor) -> int:
    if rewards_PG.shape[1] < 2:
        return 0
    return int((rewards_PG == rewards_PG[:, :1]).all(dim=1).sum())


def _summary(r: dict) -> str:
    keys = ["loss/total", "reward/mean", "loss/kl", "clip/frac", "rollout/len_mean", "optim/grad_norm"]
    return " ".join(f"{k.split('/')[-1]}={r[k]:.3g}" for k in keys if k in r)


def _truncate_log(path: Path, step: int) -> None:
    """Drop records a killed run wrote after its last checkpoint: the resumed run rewrites them."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _log(run_dir: Path, dist, record: dict) -> None:
    if dist.is_main:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _save_best(model, processor, run_dir: Path, dist) -> None:
    state = distributed.full_state_dict(model, dist)  # None on one process
    if dist.is_main:
        save_model(model if state is None else _whole_copy(model, state), processor, run_dir / "best")
    distributed.barrier()


def _whole_copy(model, state: dict):
    """An unsharded model (same class, config and adapters) holding the gathered `state`."""
    from transformers import GraniteSpeechForConditionalGeneration

    with torch.device("meta"):
        whole = GraniteSpeechForConditionalGeneration(model.config)
        for name, peft_cfg in getattr(model, "peft_config", {}).items():
            whole.add_adapter(peft_cfg, adapter_name=name)
    whole.load_state_dict(state, strict=True, assign=True)
    whole.tie_weights()
    whole.generation_config = model.generation_config
    return whole


def _dump_rollouts(run_dir: Path, step: int, batch: dict, texts: list[str], rewards_PG, G: int,
                   n_prompts: int = 2) -> None:
    out = run_dir / "rollouts"
    out.mkdir(exist_ok=True)
    lines = []
    for p in range(min(n_prompts, rewards_PG.shape[0])):
        lines.append(f"### {batch['ids'][p]}\nreference: {batch['references'][p]}")
        for g in range(G):
            lines.append(f"  [{float(rewards_PG[p, g]):.3f}] {texts[p * G + g]}")
    (out / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n")
