"""Worker for tests/test_rollout_lockstep.py: sample_groups on a tiny Granite Speech sharded with
FSDP2 over 2 gloo ranks whose rows end at very different steps.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/rollout_worker.py --out D

Rank 0's rows all end at their first token (its EOS is the token greedy decoding emits first);
rank 1's never end (an EOS greedy decoding never emits), so they run to max_new_tokens. Each
rank first decodes its own batch alone with an unsharded copy of the model (no process group
yet); then, sharded, with each decode engine; rank 0 writes what it and rank 1 saw.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_speech.distributed import (  # noqa: E402
    all_gather_object, cleanup, init_distributed, shard_model, through_root,
)
from grpo_speech.rollout import sample_groups  # noqa: E402

N, G = 12, 2  # max_new_tokens, group size
AUDIO = 49  # <|audio|> id of tiny_config(50, 49)


class Tokenizer:
    """What sample_groups needs of a tokenizer: ids in, text out."""
    eos_token_id, pad_token_id = 0, 0

    def batch_decode(self, ids_BT, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids_BT.tolist()]


def batch_of(rank: int) -> dict:
    # One prompt: 21 audio slots (100 feature frames) and 4 text tokens, different per rank.
    g = torch.Generator().manual_seed(10 + rank)
    text = torch.randint(1, 48, (1, 4), generator=g)
    return {"input_ids": torch.cat([torch.full((1, 21), AUDIO), text], dim=1),
            "attention_mask": torch.ones(1, 25, dtype=torch.long),
            "input_features": torch.randn(1, 100, 160, generator=g)}


def rollout(model, batch, eos, **kw):
    r = through_root(model, sample_groups, model, batch, group_size=G, max_new_tokens=N, temperature=0,
                     tokenizer=Tokenizer(), eos_token_id=eos, **kw)
    return {"ids": r.completion_ids_BT.tolist(), "mask": r.mask_BT.tolist(),
            "logprobs": r.logprobs_BT.tolist(), "path": r.decode_path}


def main() -> None:
    from transformers import GraniteSpeechForConditionalGeneration

    from grpo_speech.model import tiny_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration(tiny_config(50, AUDIO)).eval()
    model.model.encoder.requires_grad_(False)
    batch = batch_of(rank)

    # Alone (no process group yet): greedy tokens pick this rank's EOS, then the reference.
    alone = copy.deepcopy(model)
    probe = sample_groups(alone, batch, group_size=G, max_new_tokens=N, temperature=0, tokenizer=Tokenizer(),
                          eos_token_id=-1, sampler="dynamic")
    seen = set(sum(probe.completion_ids_BT.tolist(), []))
    eos = probe.completion_ids_BT[0, 0].item() if rank == 0 else min(set(range(48)) - seen)
    want = rollout(alone, batch, eos, sampler="dynamic")
    with torch.no_grad():
        logits_want = alone(**batch).logits

    d = init_distributed()
    model = shard_model(model, d)
    got = {"default": rollout(model, batch, eos),  # what train.py and evaluate.py call
           "static": rollout(model, batch, eos, sampler="static", check_every=3),
           "dynamic": rollout(model, batch, eos, sampler="dynamic"),
           "dynamic_per_layer": rollout(model, batch, eos, sampler="dynamic", gather_weights=False)}
    # After the rollout the units are sharded again with their reshard-after-forward restored,
    # and a forward of the sharded model still gives the unsharded model's logits.
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    restored = all(m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None for m in units)
    resharded = all(type(p).__name__ == "DTensor" for m in units for p in m.parameters())
    with torch.no_grad():
        logits = model(**batch).logits
    mine = {"rank": d.rank, "eos": eos, "want": want, "got": got, "restored": restored,
            "resharded": resharded, "forward_diff": (logits - logits_want).abs().max().item()}
    everyone = all_gather_object(mine, d)
    if d.is_main:
        (out / "result.json").write_text(json.dumps(everyone))
    cleanup()


if __name__ == "__main__":
    main()
