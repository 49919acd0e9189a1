"""Worker for tests/test_distributed.py: the same few training steps on 1 process or under torchrun.

    python tests/dist_worker.py --out D                                          # reference
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --out D   # FSDP2, gloo

A toy model laid out like Granite Speech (model.encoder frozen, model.projector,
model.language_model.layers with a frozen base projection plus a trainable low-rank adapter,
lm_head tied to embed_tokens). The global batch has uneven token counts per rank; the loss is the
token sum divided by the GLOBAL token count. Rank 0 writes losses, step-1 gradients, parameters,
the gradients of one step of the real Granite Speech class at a tiny size, and each loss
variant's step gradient from the training loop's own normalisers and advantages.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_speech.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from grpo_speech.distributed import (  # noqa: E402
    all_reduce_dict, all_reduce_sum, cleanup, init_distributed, shard_indices, shard_model,
)

V, H, M, R = 23, 16, 10, 4  # vocab, hidden, audio feature dim, adapter rank


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(H)
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.qkv.requires_grad_(False)  # frozen base weight, as under a LoRA
        self.lora_a = torch.nn.Linear(H, R, bias=False)
        self.lora_b = torch.nn.Linear(R, 3 * H, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(H, 2 * H), torch.nn.GELU(), torch.nn.Linear(2 * H, H))

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        h = self.norm(x_BTH)
        q, k, v = (self.qkv(h) + self.lora_b(self.lora_a(h))).chunk(3, dim=-1)
        x_BTH = x_BTH + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x_BTH + self.mlp(x_BTH)


class LM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(V, H)
        self.layers = torch.nn.ModuleList(Layer() for _ in range(3))
        self.norm = torch.nn.LayerNorm(H)


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(M, H), torch.nn.Tanh(), torch.nn.Linear(H, H))
        self.encoder.requires_grad_(False)
        self.projector = torch.nn.Linear(H, H)
        self.language_model = LM()


class ToySpeechLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def forward(self, feats_BFM: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
        audio_BFH = self.model.projector(self.model.encoder(feats_BFM))
        lm = self.model.language_model
        x = torch.cat([audio_BFH, lm.embed_tokens(ids_BT)], dim=1)
        for layer in lm.layers:
            x = layer(x)
        return self.lm_head(lm.norm(x))[:, feats_BFM.shape[1]:]  # logits of the text positions


def build(d):
    torch.manual_seed(0)
    model = shard_model(ToySpeechLM().to(d.device), d)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def global_batch():
    # 6 rows; row lengths make rank 0 (rows 0, 2, 4) hold 9+8+7=24 tokens and rank 1 (rows 1, 3, 5)
    # 2+3+1=6: a per-rank mean followed by an average over ranks would weight them wrongly.
    g = torch.Generator().manual_seed(1)
    feats_BFM = torch.randn(6, 3, M, generator=g)
    ids_BT = torch.randint(0, V, (6, 10), generator=g)
    lengths = torch.tensor([9, 2, 8, 3, 7, 1])
    mask_BT = (torch.arange(10)[None, :] < lengths[:, None]).float()
    return feats_BFM, ids_BT, mask_BT


def train_step(model, opt, sched, d, micro: int = 2) -> tuple[float, dict]:
    feats_BFM, ids_BT, mask_BT = global_batch()
    rows = shard_indices(6, d)
    # |G|: completion tokens of this step over all ranks, counted once before the micro-batch loop
    n_tokens = all_reduce_sum(mask_BT[rows, 1:].sum().item())
    opt.zero_grad()
    loss_sum = 0.0
    for i in range(0, len(rows), micro):
        r = rows[i:i + micro]
        logits_BTV = model(feats_BFM[r], ids_BT[r])
        nll_BT = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), ids_BT[r, 1:].flatten(), reduction="none")
        loss = (nll_BT.view(len(r), -1) * mask_BT[r, 1:]).sum() / n_tokens
        loss.backward()
        loss_sum += loss.item()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    opt.step()
    sched.step()
    return all_reduce_sum(loss_sum), {"grads": grads, "grad_norm": grad_norm.item()}


def granite_grads(d) -> dict[str, torch.Tensor]:
    """Gradients of one token-mean loss step of the real (tiny) Granite Speech class: frozen
    conformer encoder, trainable projector and LM, lm_head tied to embed_tokens."""
    from transformers import GraniteSpeechForConditionalGeneration

    from grpo_speech.model import tiny_config

    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration(tiny_config(50, 49))  # vocab 50, <|audio|> = 49
    model.model.encoder.requires_grad_(False)
    model = shard_model(model.to(d.device).eval(), d)  # eval: no dropout, same numbers on 1 or 2 ranks
    g = torch.Generator().manual_seed(4)
    feats_BFM = torch.randn(2, 100, 160, generator=g)  # 100 feature frames -> 21 audio tokens each
    ids_BT = torch.cat([torch.full((2, 21), 49), torch.randint(0, 48, (2, 10), generator=g)], dim=1)
    mask_BT = torch.zeros(2, 31)
    mask_BT[0, 21:30] = 1  # 9 completion tokens on rank 0, 3 on rank 1
    mask_BT[1, 21:24] = 1
    rows = shard_indices(2, d)
    n_tokens = all_reduce_sum(mask_BT[rows, 1:].sum().item())
    logits_BTV = model(input_ids=ids_BT[rows], input_features=feats_BFM[rows]).logits
    nll = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), ids_BT[rows, 1:].flatten(), reduction="none")
    ((nll.view(len(rows), -1) * mask_BT[rows, 1:]).sum() / n_tokens).backward()
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


# Config overrides of each loss variant whose normaliser is global (bnpo's is per micro-batch).
LOSS_VARIANTS = {
    "dapo": [],
    "grpo": ["grpo.loss_type=grpo"],
    "dr_grpo": ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=none"],
    "cispo": ["grpo.loss_type=cispo"],
    "gspo": ["grpo.loss_type=grpo", "grpo.importance_sampling=sequence", "grpo.eps_low=0.05", "grpo.eps_high=0.05"],
    "delta_batch_std": ["grpo.delta=1.3", "grpo.scale_rewards=batch"],
}


def loss_variant_grads(d) -> dict[str, torch.Tensor]:
    """For each loss variant, the gradient of one step's loss with respect to every completion
    log-prob of a fixed global step (6 prompts x G = 3, uneven lengths, ratios away from 1), built
    from the loop's own pieces: group_rewards (scale_rewards=batch reduces its std over ranks),
    rank_micro_batches, loss_denominators and loss_options. A rank holds the loop's prompts for it
    (r, r + W, ...), one prompt per micro-batch; its rows' gradients are summed over ranks."""
    from grpo_speech.config import load_config
    from grpo_speech.loss import policy_loss
    from grpo_speech.train import group_rewards, loss_denominators, loss_options, rank_micro_batches, rows_of

    P, G, T = 6, 3, 5
    g = torch.Generator().manual_seed(7)
    rewards_B = torch.rand(P * G, generator=g, dtype=torch.float64)
    base_BT = torch.randn(P * G, T, generator=g, dtype=torch.float64) - 2.0
    old_BT = base_BT + 0.3 * torch.randn(P * G, T, generator=g, dtype=torch.float64)
    ref_BT = base_BT + 0.2 * torch.randn(P * G, T, generator=g, dtype=torch.float64)
    lengths_B = torch.randint(1, T + 1, (P * G,), generator=g)
    mask_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).long()
    mine = shard_indices(P, d)
    rows = rows_of(mine, G)
    texts = [str(int(i)) for i in rows]  # the reward of row i, read back by the reward function
    reward_fn = lambda hyps, refs: rewards_B[[int(h) for h in hyps]]  # noqa: E731
    mask_bt = mask_BT[rows]
    num_tokens = all_reduce_sum(mask_bt.sum().float()).item()
    out = {}
    for name, over in LOSS_VARIANTS.items():
        cfg = load_config(None, over + ["grpo.group_size=3", "grpo.max_new_tokens=5"])
        _, adv_b = group_rewards(texts, ["ref"] * len(mine), reward_fn, G, torch.device("cpu"),
                                 scale=cfg.grpo.scale_rewards)
        chunks = rank_micro_batches(mask_bt, len(mine), G, G)
        den = loss_denominators(cfg.grpo.loss_type, mask_bt, chunks, num_tokens=num_tokens,
                                max_new_tokens=cfg.grpo.max_new_tokens)
        x_bT = base_BT[rows].clone().requires_grad_()
        for i, (c, _) in enumerate(chunks):
            loss, _ = policy_loss(x_bT[c], old_BT[rows][c], ref_BT[rows][c], adv_b[c], mask_bt[c],
                                  denominator=den[i], **loss_options(cfg.grpo))
            loss.backward()
        grad_BT = torch.zeros_like(base_BT)
        grad_BT[rows] = x_bT.grad
        out[name] = all_reduce_sum(grad_BT)
    return out


def shared_prefix_grads(d) -> dict[str, torch.Tensor]:
    """Gradients of a weighted sum of completion log-probs of the real (tiny) Granite Speech class
    sharded by FSDP2, from the shared-prefix pass ("shared.*") and the per-row pass ("row.*"): 4
    prompts of different lengths (left padded) x G = 3 completions of different lengths, a rank
    holding prompts r, r+2 as one micro-batch of whole groups; projector and LM train."""
    from transformers import GraniteSpeechForConditionalGeneration

    from grpo_speech.model import tiny_config
    from grpo_speech.rollout import sequence_logprobs

    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration(tiny_config(50, 49))  # vocab 50, <|audio|> = 49
    model.model.encoder.requires_grad_(False)
    model = shard_model(model.to(d.device).eval(), d)
    P, G, T, text = 4, 3, 6, 5
    g = torch.Generator().manual_seed(5)
    feats_PFM = torch.randn(P, 100, 160, generator=g)  # 21 audio tokens each
    ids_PT = torch.cat([torch.full((P, 21), 49), torch.randint(0, 48, (P, text), generator=g)], dim=1)
    attn_PT = torch.ones_like(ids_PT)
    for p, pad in enumerate([0, 2, 4, 1]):  # left padding: prompts of different lengths
        ids_PT[p] = torch.cat([torch.zeros(pad, dtype=torch.long), ids_PT[p, :ids_PT.shape[1] - pad]])
        attn_PT[p, :pad] = 0
    ids_BT = torch.randint(0, 48, (P * G, T), generator=g)
    lengths_B = torch.randint(1, T + 1, (P * G,), generator=g)
    mask_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).long()
    weights_BT = torch.randn(P * G, T, generator=g)
    batch = {"input_ids": ids_PT, "attention_mask": attn_PT, "input_features": feats_PFM}
    rows = torch.tensor([p * G + k for p in shard_indices(P, d) for k in range(G)])
    out = {}
    for name, shared in (("shared", True), ("row", False)):
        model.zero_grad(set_to_none=True)
        lp = sequence_logprobs(model, batch, None, ids_BT[rows], mask_BT[rows], group_size=G, rows_B=rows,
                               shared_prefix=shared)
        (lp * weights_BT[rows]).sum().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                out[f"{name}.{n}"] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
    return out


def full_params(model) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    torch.set_num_threads(1)
    d = init_distributed()
    model, opt, sched = build(d)
    loss1, info1 = train_step(model, opt, sched, d)
    loss2, info2 = train_step(model, opt, sched, d)
    save_checkpoint(out / "ckpt", step=2, model=model, optimizer=opt, scheduler=sched, extra={})
    loss3, _ = train_step(model, opt, sched, d)
    params3 = full_params(model)

    # resume: fresh sharded model and optimizer, load step 2, the third step must repeat exactly
    model_b, opt_b, sched_b = build(d)
    load_checkpoint(out / "ckpt" / "step_000002", model=model_b, optimizer=opt_b, scheduler=sched_b)
    loss3_b, _ = train_step(model_b, opt_b, sched_b, d)
    params3_b = full_params(model_b)

    g_granite = granite_grads(d)
    g_variants = loss_variant_grads(d)
    g_prefix = shared_prefix_grads(d)
    reduced = all_reduce_dict({"rank": float(d.rank), "one": 1.0})
    if d.is_main:
        same = all(torch.equal(params3[k], params3_b[k]) for k in params3)
        (out / "result.json").write_text(json.dumps({
            "world_size": d.world_size, "losses": [loss1, loss2, loss3], "loss3_resumed": loss3_b,
            "resumed_params_equal": same, "reduced": reduced, "grad_norms": [info1["grad_norm"], info2["grad_norm"]],
        }))
        safetensors.torch.save_file({k: v.contiguous() for k, v in info1["grads"].items()}, str(out / "grads1.safetensors"))
        safetensors.torch.save_file({k: v.contiguous() for k, v in g_granite.items()},
                                    str(out / "granite_grads.safetensors"))
        safetensors.torch.save_file(g_variants, str(out / "loss_variant_grads.safetensors"))
        safetensors.torch.save_file(g_prefix, str(out / "shared_prefix_grads.safetensors"))
        params3.pop("lm_head.weight", None)  # tied to embed_tokens
        safetensors.torch.save_file({k: v.contiguous() for k, v in params3.items()}, str(out / "params3.safetensors"))
    cleanup()


if __name__ == "__main__":
    main()
