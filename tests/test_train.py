"""The training loop end to end on a tiny random Granite Speech and a few synthetic clips:
SFT, GRPO and MP-GRPO run and write their outputs; a SIGKILLed run resumes to the same losses;
two FSDP2 ranks (gloo) match one process; a clip that does not decode is skipped in its batch and
a checkpoint that does not load is passed over for the one before it; the loss variants'
normalisers are counted once per step and run end to end.

    .venv/bin/python -m pytest -q tests/test_train.py
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_speech.config import load_config
from grpo_speech.loss import policy_loss
from grpo_speech.train import (
    group_rewards, loss_denominators, loss_options, micro_batches, rank_micro_batches, rows_of, step_indices, train,
)

sys.path.insert(0, str(Path(__file__).parent))
from resume_harness import run_killed_then_resumed, run_to_end  # noqa: E402
from tiny_run import make_tiny_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny model (own BPE tokenizer) and an 8/2/2-clip synthetic ast dataset."""
    root = tmp_path_factory.mktemp("train")
    make_tiny_run(root, 8)
    return root


def overrides(root: Path, run: str, method: str, **extra) -> list[str]:
    base = {
        "method": method, "task": "ast", "model.path": str(root / "base"), "data.dir": str(root / "data"),
        "data.n_train": 8, "data.n_val": 2, "data.n_test": 2,
        "run.dir": str(root / run), "train.max_steps": 2, "train.prompts_per_step": 4,
        "train.micro_batch_size": 4, "train.eval_every": 100, "train.save_every": 100,
        "grpo.group_size": 3, "grpo.max_new_tokens": 6, "eval.max_new_tokens": 6, "train.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_step_indices_cover_epochs_and_rows_belong_to_prompts():
    # 5 examples, 2 prompts a step: steps 0-1 take 4 of the first epoch's permutation, step 2 the
    # last one of epoch 0 and the first of epoch 1.
    first = step_indices(0, 5, 2, seed=0) + step_indices(1, 5, 2, seed=0)
    step2 = step_indices(2, 5, 2, seed=0)
    assert len(set(first + step2[:1])) == 5  # epoch 0 is a permutation
    assert step_indices(2, 5, 2, seed=0) == step2  # pure function of (step, seed)
    # Row p*G+g belongs to prompt p: prompts [1, 2] with G = 3 -> rows 3,4,5,6,7,8.
    assert rows_of([1, 2], 3).tolist() == [3, 4, 5, 6, 7, 8]
    # 5 prompts x G=3 in micro-batches of ~7 rows -> whole groups, 2 prompts each.
    assert micro_batches(5, 3, 7) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("method", ["mpgrpo", "grpo", "sft"])
def test_methods_run_end_to_end(setup, method):
    run_dir = setup / f"run_{method}"
    # SFT also scores only the first test example: the table and results.json say how many.
    limit = {"eval.max_test_examples": 1} if method == "sft" else {}
    cfg = load_config(None, overrides(setup, run_dir.name, method, **limit))
    train(cfg)
    rows = [r for r in records(run_dir) if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    keys = {"loss/total", "optim/lr", "optim/grad_norm", "rollout/len_mean", "time/rollout", "time/train"}
    if method != "sft":
        keys |= {"reward/mean", "reward/std", "adv/zero_std_frac", "clip/frac", "loss/kl"}
    assert keys <= set(rows[0])
    # The phases follow each other without gaps: they add up to the step.
    phases = ("data", "rollout", "reward", "logprobs", "train", "optimizer", "log")
    for r in rows:
        assert sum(r[f"time/{p}"] for p in phases) == pytest.approx(r["time/step"], rel=1e-9)
        assert min(r[f"time/{p}"] for p in phases) >= 0 and r["time/train"] > 0
    summary = json.loads((run_dir / "results.json").read_text())
    results = summary["results"]
    n_test = 1 if limit else 2
    assert summary["test_examples"] == n_test
    assert summary["test_left_out"] == 2 - n_test  # the setup's test split has 2 rows
    assert f"({n_test} examples)" in (run_dir / "results.md").read_text()
    for name in ("test_references.jsonl", f"test_hyps_{method}.txt"):
        assert len((run_dir / name).read_text().splitlines()) == n_test
    assert set(results) == {"base", method}
    assert set(results["base"]) == {"bleu", "bertscore", "rouge1", "rouge2", "rougeL", "meteor", "bleu_multi"}
    assert (run_dir / "results.md").exists() and (run_dir / "reward.png").exists()
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config, as run
    # The parameters moved: the checkpoint of the last step differs from the base weights. For
    # MP-GRPO and SFT the reference answer guarantees a non-zero gradient at step 1.
    if method != "grpo":
        after = load_file(run_dir / "checkpoints" / "step_000002" / "model.safetensors")
        # HF files name weights by their saved layout; the module tree (and the checkpoint) by
        # the loaded one: compare against the loaded base.
        from transformers import GraniteSpeechForConditionalGeneration
        before = GraniteSpeechForConditionalGeneration.from_pretrained(setup / "base").state_dict()
        assert set(after) <= set(before)
        moved = [k for k in after if not torch.equal(before[k], after[k])]
        assert any(k.startswith("model.language_model.layers") for k in moved)


def _cmd(root: Path, run: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grpo_speech", "train", *overrides(root, run, "mpgrpo", **{
        "train.max_steps": 6, "train.save_every": 2}), *extra]


def test_sigkill_then_resume_reproduces_losses(setup):
    # Both runs get the same environment (thread count included: it changes reduction orders).
    run_to_end(_cmd(setup, "uninterrupted"), timeout=300)
    killed_at = run_killed_then_resumed(_cmd(setup, "killed", "resume=true"), setup / "killed" / "checkpoints",
                                        kill_after_step=2, timeout=300)
    assert 2 <= killed_at < 6
    want = {r["step"]: r["loss/total"] for r in records(setup / "uninterrupted") if "loss/total" in r}
    got = {r["step"]: r["loss/total"] for r in records(setup / "killed") if "loss/total" in r}
    assert sorted(got) == list(range(1, 7))
    assert got == want  # exactly: every random choice of a step derives from (seed, step)


def test_two_ranks_match_one_process(setup):
    # Greedy MP-GRPO: deterministic rollouts whatever the split of prompts over ranks, and the
    # reference row gives non-zero advantages. Global batch: 4 prompts, 2 per rank.
    common = ["grpo.temperature=0", "eval.temperature=0", "train.max_grad_norm=100"]
    single = subprocess.run([sys.executable, "-m", "grpo_speech", "train",
                             *overrides(setup, "one_rank", "mpgrpo"), *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "-m", "grpo_speech", "train", *overrides(setup, "two_ranks", "mpgrpo"), *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    one = {r["step"]: r for r in records(setup / "one_rank") if "loss/total" in r}
    two = {r["step"]: r for r in records(setup / "two_ranks") if "loss/total" in r}
    # Not bit-exact: the conformer encoder has no padding mask, so a clip's audio embeddings
    # depend (at ~1e-7) on the other clips padded into its batch (4 per batch on one process,
    # 2 per rank here), and AdamW's g/sqrt(v) amplifies such noise on near-zero gradients.
    # A gradient-scaling bug (e.g. ranks averaging instead of summing) doubles or halves the
    # gradient norm, far outside these tolerances; Adam alone would hide it in the parameters.
    # Step 1 (same weights on both sides): tight. Step 2 (after one AdamW update): the update's
    # noise shows in the KL to the reference, which is second order in the weight change.
    assert two[1]["loss/total"] == pytest.approx(one[1]["loss/total"], rel=1e-5)
    assert two[1]["optim/grad_norm"] == pytest.approx(one[1]["optim/grad_norm"], rel=1e-4)
    assert two[1]["reward/mean"] == pytest.approx(one[1]["reward/mean"], rel=1e-6)  # summed in another order
    assert two[2]["loss/total"] == pytest.approx(one[2]["loss/total"], rel=1e-3)
    assert two[2]["loss/kl"] == pytest.approx(one[2]["loss/kl"], rel=2e-2)
    p1 = load_file(setup / "one_rank" / "checkpoints" / "step_000002" / "model.safetensors")
    p2 = load_file(setup / "two_ranks" / "checkpoints" / "step_000002" / "model.safetensors")
    assert p1.keys() == p2.keys()
    floats = [k for k in p1 if p1[k].is_floating_point()]
    n = sum(p1[k].numel() for k in floats)
    mean_abs_diff = sum((p1[k] - p2[k]).abs().sum().item() for k in floats) / n
    # Two AdamW steps at lr 1e-3 move a parameter by up to ~2e-3; the runs agree to 10 % of a step.
    assert mean_abs_diff < 1e-4


def test_bad_clip_is_skipped_in_its_batch_and_resume_passes_over_a_torn_checkpoint(setup, capfd):
    data = setup / "data_bad_clip"
    shutil.copytree(setup / "data", data)
    clip = data / "audio/train/ast-train-000003.flac"
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # header whole, body cut
    over = overrides(setup, "bad_clip", "mpgrpo", **{"data.dir": data, "data.skip_bad": "true",
                                                      "train.save_every": 1})
    train(load_config(None, over))
    run_dir = setup / "bad_clip"
    rows = [r for r in records(run_dir) if "loss/total" in r]
    # Steps 1 and 2 draw 4 + 4 of the 8 train examples: the bad one exactly once, in one step
    # that went on with its other 3 prompts.
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["data/skipped_rows"] for r in rows) == 1
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert f"skipped {data}/train.jsonl line 4: {clip}" in capfd.readouterr().err

    # The newest checkpoint torn (a disk filled mid-write, say): resume names it and goes on
    # from step 1, and the log again ends at step 2.
    torn = run_dir / "checkpoints" / "step_000002" / "optimizer.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    train(load_config(None, over + ["resume=true"]))
    out = capfd.readouterr()
    assert f"{torn}: does not load" in out.err
    assert "resumed from " + str(run_dir / "checkpoints" / "step_000001") in out.out
    assert [r["step"] for r in records(run_dir) if "loss/total" in r] == [1, 2]


def test_two_passes_log_per_pass_means(setup):
    # grpo.num_iterations=2: two passes over one rollout. Loss, clip and ratio metrics are sums
    # over both passes divided by token counts over both passes, so ratio/mean is a per-pass mean:
    # s = 1 exactly on pass 1 and within a few % of 1 after one AdamW step at lr 1e-3 on pass 2.
    # Dividing by the pass count once more (the bug this guards against) gives about 0.5.
    run_dir = setup / "two_passes"
    train(load_config(None, overrides(setup, run_dir.name, "grpo", **{
        "grpo.num_iterations": 2, "train.max_steps": 1, "run.evaluate": "false"})))
    (row,) = [r for r in records(run_dir) if "loss/total" in r]
    assert 0.9 < row["ratio/mean"] < 1.1
    assert 0.0 <= row["clip/frac"] <= 1.0 and math.isfinite(row["loss/total"])


def test_ranks_left_with_unequal_or_no_prompts_match_one_process(setup):
    # data.skip_bad with clips 0, 3 and 5 cut short. Step 1 draws examples [4, 0, 7, 3]: rank 0
    # keeps 4 and 7, rank 1 none (it runs a placeholder prompt that counts for nothing). Step 2
    # draws [2, 5, 1, 6]: rank 0 keeps 2 and 1, rank 1 keeps 6. With one prompt per micro-batch
    # the ranks hold 2 and 1 micro-batches, yet both must run 2 forward/backward passes (FSDP
    # collectives pair up) and the token count must be that of the kept rows alone, so the
    # losses and gradient norms are those of one process on the same data (greedy rollouts).
    assert step_indices(0, 8, 4, seed=0) == [4, 0, 7, 3] and step_indices(1, 8, 4, seed=0) == [2, 5, 1, 6]
    data = setup / "data_three_bad"
    shutil.copytree(setup / "data", data)
    for i in (0, 3, 5):
        clip = data / f"audio/train/ast-train-{i:06d}.flac"
        clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    common = ["grpo.temperature=0", "train.max_grad_norm=100", "data.skip_bad=true", "run.evaluate=false",
              "train.micro_batch_size=3"]
    runs = {}
    for name, launcher, env in [("one", [], {}), ("two", ["-m", "torch.distributed.run", "--nproc_per_node=2"],
                                                   {"OMP_NUM_THREADS": "1"})]:
        cmd = [sys.executable, *launcher, "-m", "grpo_speech", "train",
               *overrides(setup, f"uneven_{name}", "mpgrpo", **{"data.dir": data}), *common]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = {r["step"]: r for r in records(setup / f"uneven_{name}") if "loss/total" in r}
    one, two = runs["one"], runs["two"]
    assert sorted(two) == [1, 2] and [two[s]["data/skipped_rows"] for s in (1, 2)] == [2, 1]
    assert two[1]["reward/mean"] == pytest.approx(one[1]["reward/mean"], rel=1e-6)
    assert two[1]["rollout/len_mean"] == pytest.approx(one[1]["rollout/len_mean"], rel=1e-6)
    assert two[1]["loss/total"] == pytest.approx(one[1]["loss/total"], rel=1e-5)
    assert two[1]["optim/grad_norm"] == pytest.approx(one[1]["optim/grad_norm"], rel=1e-4)
    assert two[2]["loss/total"] == pytest.approx(one[2]["loss/total"], rel=1e-3)


def test_bertscore_reward_uses_the_eval_bertscore_model(setup):
    # Training with reward=bertscore loads the eval.bertscore_model directory (one setting for
    # training and evaluation); a missing one is reported by name before any step runs, where the
    # reward used to ignore it and load the default MiniLM.
    missing = setup / "no_such_bertscore_model"
    cfg = load_config(None, overrides(setup, "bertscore_missing", "grpo", **{
        "grpo.reward": "bertscore", "eval.bertscore_model": missing, "run.evaluate": "false"}))
    with pytest.raises(FileNotFoundError, match="no_such_bertscore_model"):
        train(cfg)


def test_the_test_scoring_bertscore_model_is_checked_before_the_first_step(setup):
    # reward=bleu: BERTScore is needed only by the final test scoring, and a model that does not
    # load is refused at start, not after the last step.
    from grpo_speech.rewards import BertScoreModelError
    cfg = load_config(None, overrides(setup, "bertscore_late", "grpo", **{
        "eval.bertscore_model": setup / "no_such_bertscore_model", "run.evaluate": "true"}))
    with pytest.raises(BertScoreModelError, match="no_such_bertscore_model"):
        train(cfg)
    assert not (setup / "bertscore_late" / "metrics.jsonl").exists()


def test_lora_run_checkpoints_hold_the_adapter_and_best_is_a_peft_directory(setup):
    import safetensors.torch as st
    from peft import PeftModel
    from transformers import GraniteSpeechForConditionalGeneration

    from grpo_speech.checkpoint import CheckpointError
    from grpo_speech.model import export_merged, load_model, save_model, build_tiny_model, build_tokenizer
    from grpo_speech.config import ModelConfig

    base = setup / "lora_base"
    shutil.copytree(setup / "base", base)
    lora = {"model.path": base, "model.train": "lora", "model.lora_rank": 4, "train.save_every": 2,
            "train.max_steps": 4, "train.lr": 0.05, "run.evaluate": "false"}
    cfg = load_config(None, overrides(setup, "lora_run", "grpo", **lora))
    train(cfg)
    run = setup / "lora_run"
    first = {r["step"]: r["loss/total"] for r in records(run) if "loss/total" in r}
    # 1. Checkpoints hold the LoRA alone (and its AdamW moments), with the base's identity.
    tensors = st.load_file(run / "checkpoints" / "step_000004" / "model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained away from 0
    lora_bytes = sum(t.numel() * 4 for t in tensors.values())
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_000004").iterdir())
    assert size < 1.1 * 3 * lora_bytes + 64_000  # parameters + two moments, plus small files
    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["extra"]["base"]["path"] == str(base)
    # 2. Resuming from the step-2 checkpoint replays steps 3-4 exactly.
    shutil.rmtree(run / "checkpoints" / "step_000004")
    train(load_config(None, overrides(setup, "lora_run", "grpo", **lora, resume="true")))
    again = {r["step"]: r["loss/total"] for r in records(run) if "loss/total" in r}
    assert again == first and len(first) == 4
    # 3. best/ of a LoRA run is a peft adapter directory over the base: transformers + peft load
    # it alone (here a LoRA with non-zero weights, saved the way the loop saves best/).
    from grpo_speech.distributed import init_distributed
    from grpo_speech.model import save_best
    model, processor = load_model(ModelConfig(path=str(base), train="lora", lora_rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    best = setup / "lora_best"
    save_best(model, processor, best, init_distributed(), str(base))
    assert (best / "adapter_config.json").is_file() and not (best / "model.safetensors").exists()
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    peft_model = PeftModel.from_pretrained(GraniteSpeechForConditionalGeneration.from_pretrained(base), best).eval()
    ours, _ = load_model(ModelConfig(path=str(best), train="lora"))
    ours.eval()
    from grpo_speech.data import collate, load_split
    import random
    batch = collate(load_split(cfg, "test").examples[:2], processor, rng=random.Random(0))
    inputs = {k: v for k, v in batch.items() if hasattr(v, "shape")}
    with torch.no_grad():
        want = peft_model(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(**inputs).logits, want, atol=1e-6, rtol=0)
        plain = GraniteSpeechForConditionalGeneration.from_pretrained(base).eval()(**inputs).logits
        assert (plain - want).abs().max() > 1e-3  # the adapter changes the model
    # 4. export: a full model with the LoRA merged in, no adapter.
    merged = export_merged(str(best), str(setup / "lora_merged"))
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        got = GraniteSpeechForConditionalGeneration.from_pretrained(merged).eval()(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # 5. Another base under the same path: the adapter checkpoint is refused, by name.
    tok = build_tokenizer(["other words"] * 20, 400)
    other, other_proc = build_tiny_model(tok, enc_layers=1, lm_layers=1, dropout=0.0)
    shutil.rmtree(base)
    save_model(other, other_proc, base)
    with pytest.raises(CheckpointError, match="holds adapter weights for the base"):
        train(load_config(None, overrides(setup, "lora_run", "grpo", **lora, resume="true")))


# ---- Loss variants: the counts the loop takes once per step, and runs end to end ----

def _step_mask():
    # 4 prompts x G = 2: row lengths 3, 1, 2, 2 | 1, 1, 0, 0 (prompt 3 is a placeholder's: no
    # tokens). Micro-batches of 2 prompts: rows 0-3 hold 8 tokens, rows 4-7 hold 2.
    lengths = torch.tensor([3, 1, 2, 2, 1, 1, 0, 0])
    return (torch.arange(3)[None, :] < lengths[:, None]).long()


def test_loss_denominators_by_hand():
    mask_BT = _step_mask()
    chunks = rank_micro_batches(mask_BT, 4, 2, 4)
    assert [(c.tolist(), torch.equal(m, mask_BT[c])) for c, m in chunks] == [([0, 1, 2, 3], True), ([4, 5, 6, 7], True)]
    n = float(mask_BT.sum())  # 10, as the loop's num_tokens
    assert loss_denominators("dapo", mask_BT, chunks, num_tokens=n, max_new_tokens=5) == [10.0, 10.0]
    assert loss_denominators("cispo", mask_BT, chunks, num_tokens=n, max_new_tokens=5) == [10.0, 10.0]
    # grpo: 6 rows hold tokens; dr_grpo: 6 x max_new_tokens 5 = 30.
    assert loss_denominators("grpo", mask_BT, chunks, num_tokens=n, max_new_tokens=5) == [6.0, 6.0]
    assert loss_denominators("dr_grpo", mask_BT, chunks, num_tokens=n, max_new_tokens=5) == [30.0, 30.0]
    # bnpo: each micro-batch's own tokens x the 2 micro-batches of the step: 8 x 2, 2 x 2. A
    # repeated chunk that does not count (a rank with fewer prompts) holds nothing: 1 x 2.
    assert loss_denominators("bnpo", mask_BT, chunks, num_tokens=n, max_new_tokens=5) == [16.0, 4.0]
    padded = chunks + [(chunks[-1][0], torch.zeros_like(chunks[-1][1]))]
    assert loss_denominators("bnpo", mask_BT, padded, num_tokens=n, max_new_tokens=5) == [16.0, 4.0, 2.0]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo"])
def test_the_loops_normalisers_make_one_and_four_micro_batches_agree_except_bnpo(loss_type):
    # The loop's pieces (rank_micro_batches, loss_denominators, loss_options, policy_loss) on one
    # step of 4 prompts x G = 2 at micro_batch_size 8 (one micro-batch) and 2 (four).
    g = torch.Generator().manual_seed(0)
    mask_BT = _step_mask()
    base_BT = torch.randn(8, 3, generator=g, dtype=torch.float64) - 2.0
    old_BT = base_BT + 0.3 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    adv_B = torch.randn(8, generator=g, dtype=torch.float64)
    cfg = load_config(None, [f"grpo.loss_type={loss_type}", "grpo.beta=0", "grpo.max_new_tokens=5"])
    grads, losses = [], []
    for micro_batch_size in (8, 2):
        chunks = rank_micro_batches(mask_BT, 4, 2, micro_batch_size)
        den = loss_denominators(loss_type, mask_BT, chunks, num_tokens=float(mask_BT.sum()), max_new_tokens=5)
        x = base_BT.clone().requires_grad_()
        total = 0.0
        for i, (rows, _) in enumerate(chunks):
            loss, _ = policy_loss(x[rows], old_BT[rows], None, adv_B[rows], mask_BT[rows], denominator=den[i],
                                  **loss_options(cfg.grpo))
            loss.backward()
            total += loss.item()
        grads.append(x.grad)
        losses.append(total)
    if loss_type == "bnpo":
        # The mean of micro-batch means: 1 micro-batch of 10 tokens vs 4 of 4, 4, 2 and 0 tokens
        # (3 with tokens): the weights per token are 1/10 vs 1/12, 1/12 and 1/6. Not invariant.
        assert (grads[0] - grads[1]).abs().max() > 1e-3
        torch.testing.assert_close(grads[1][0] * 12, grads[0][0] * 10, rtol=0, atol=1e-15)
    else:
        assert losses[1] == pytest.approx(losses[0], abs=1e-14)
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-15)


def test_batch_scaled_advantages_leave_a_placeholder_prompt_out():
    # Rewards read from the texts; prompts 0-1 are real, prompt 2 a placeholder (real_prompts=2).
    # Real rewards 0, 1, 0.5, 0.5: mean 0.5, squared deviations 0.25 + 0.25 + 0 + 0 = 0.5,
    # unbiased var 0.5 / 3, std sqrt(1/6) = 0.408248. Prompt 0: A = (-0.5, 0.5) / (0.408248 + 1e-4).
    # Counting the placeholder's rewards (9, 9) would change the std.
    texts = ["0", "1", "0.5", "0.5", "9", "9"]
    reward_fn = lambda hyps, refs: torch.tensor([float(h) for h in hyps])  # noqa: E731
    rewards_PG, adv_B = group_rewards(texts, ["a", "b", "c"], reward_fn, 2, torch.device("cpu"), scale="batch",
                                      real_prompts=2)
    assert rewards_PG.tolist() == [[0.0, 1.0], [0.5, 0.5], [9.0, 9.0]]
    s = math.sqrt(1 / 6) + 1e-4
    torch.testing.assert_close(adv_B, torch.tensor([-0.5 / s, 0.5 / s, 0, 0, 0, 0]), rtol=0, atol=1e-6)
    _, group_B = group_rewards(texts, ["a", "b", "c"], reward_fn, 2, torch.device("cpu"))
    assert group_B[1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4), abs=1e-6)  # group std sqrt(0.5)


def test_loss_options_follow_the_config():
    cfg = load_config(None, ["grpo.loss_type=cispo", "grpo.importance_sampling=sequence", "grpo.delta=1.5",
                             "grpo.eps_high=0.28"])
    assert loss_options(cfg.grpo) == {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.02, "delta": 1.5,
                                      "sequence_ratio": True, "truncated_is": True, "row_mean": False}
    assert loss_options(load_config().grpo) == {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.02, "delta": 0.0,
                                                "sequence_ratio": False, "truncated_is": False, "row_mean": False}


def test_sequence_ratios_change_nothing_on_one_pass(setup):
    # On a single pass pi_old is the current policy: every ratio is exactly 1 and GSPO's gradient
    # is the token-level one, so two runs of 2 steps log the same numbers to the last bit.
    logs = {}
    for level in ("token", "sequence"):
        run_dir = setup / f"one_pass_{level}"
        train(load_config(None, overrides(setup, run_dir.name, "grpo", **{
            "grpo.importance_sampling": level, "run.evaluate": "false"})))
        logs[level] = [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))}
                       for r in records(run_dir)]
    assert logs["token"] == logs["sequence"] and len(logs["token"]) == 2


@pytest.mark.parametrize("method, variant", [
    ("grpo", {"grpo.loss_type": "grpo", "grpo.importance_sampling": "sequence", "grpo.scale_rewards": "batch",
              "grpo.delta": 1.5, "grpo.num_iterations": 2}),
    ("mpgrpo", {"grpo.loss_type": "cispo", "grpo.scale_rewards": "none", "grpo.num_iterations": 2}),
    ("mpgrpo", {"grpo.loss_type": "dr_grpo", "grpo.scale_rewards": "none"}),
    ("grpo", {"grpo.loss_type": "bnpo", "train.micro_batch_size": 3}),
])
def test_loss_variants_run_end_to_end(setup, method, variant):
    name = "variant_" + "_".join(str(v) for v in variant.values()).replace(".", "")
    train(load_config(None, overrides(setup, name, method, **variant, **{"run.evaluate": "false"})))
    rows = [r for r in records(setup / name) if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["optim/grad_norm"]) for r in rows)
    assert all(0.0 <= r["clip/frac"] <= 1.0 and 0.5 < r["ratio/mean"] < 2.0 for r in rows)
