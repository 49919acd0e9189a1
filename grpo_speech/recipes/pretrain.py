"""Pretrain the tiny embedded base model from scratch: the role Granite Speech plays in the paper.

    python -m grpo_speech pretrain                       # the committed recipe (make pretrain)
    python -m grpo_speech pretrain pretrain.steps=50 pretrain.out=/tmp/base pretrain.work_dir=/tmp/pt
The recipe's settings are the `pretrain` section of the typed config (config.PretrainConfig),
given as the trainer's are: `--config FILE` and `key=value` overrides.

Multi-task, like a speech LLM's own training: ASR, plus speech translation (ast) and spoken QA
(sqa) drawn from the data module's "pretrain" domain (other names, prompt wordings and frame
weights than the target splits, and frames of its own), so the base has zero-shot skill on the
targets that GRPO can sharpen, plus text-only translation pairs of the same domain (the LM's share
of text). Answer tokens get
cross-entropy. What it took to make a model this small read speech at all (each measured with the
probe below, which compares held-out ASR loss with the real audio and with silence):
  - CTC on characters through the encoder's own `out` head, at the mid layer (where Granite applies
    it) and at the top: the encoder learns far faster than from the LM's loss alone;
  - token CTC at the LM's audio positions (the transcript read from the LM's own logits there):
    without it the projector's output collapses to one vector for every clip within 100 steps;
  - a projector initialised to let audio content through, at the scale of the token embeddings,
    and kept frozen for the first half: trained from the start it also collapses;
  - one audio embedding per 3 encoder frames (Granite: 3 per 15), and a first phase of lists of 1-3
    words, which no language-model prior can guess.
Resumable: a killed run started again with the same settings continues from its last checkpoint
in pretrain.work_dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F

from grpo_speech.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grpo_speech.config import Config, ConfigError, PretrainConfig, UserError, load_config, parse_mix, replace
from grpo_speech.data import collate, load_split, load_synthetic, templates_for
from grpo_speech.data.collate import chat_prompt
from grpo_speech.data.prompts import AUDIO
from grpo_speech.data.rows import RowChecker
from grpo_speech.data.grammar import sentence_pairs
from grpo_speech.data.synth import spoken_text, synthesize, task_texts, text_corpus
from grpo_speech.distributed import step_seed
from grpo_speech.loss import sft_loss
from grpo_speech.metrics import multi_reference_bleu
from grpo_speech.model import build_tiny_model, build_tokenizer, save_model
from grpo_speech.rollout import encode_audio, sample_groups, tokenize_targets
from grpo_speech.train import lr_lambda

DEFAULT_OUT = Path(__file__).parents[1] / "assets" / "tiny_base"


def _shown_path(path: str) -> str:
    """`path` relative to the checkout when it lies inside it (the report is committed with the
    base; the machine's own directories do not belong in it)."""
    root = Path(__file__).parents[2]
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# CTC symbols of the encoder's `out` head: 0 is the blank. Transcripts are lowercased; other
# characters (punctuation) are dropped, digits do not occur (numbers are spoken as words).
CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'"
CTC_INDEX = {c: i + 1 for i, c in enumerate(CTC_CHARS)}
# Pretraining data: (name, task, domain, seed). ast/sqa come from the pretrain domain only; ASR
# clips are target-domain English (a speech model knows the language, not the tasks).
SOURCES = [("asr", "asr", "target", 1), ("ast", "ast", "pretrain", 1), ("sqa", "sqa", "pretrain", 1),
           ("words", "words", "target", 1)]


def parse_args(argv: list[str]) -> Config:
    """`[--config FILE] [key=value ...]`, read as the trainer reads them: the typed config, whose
    pretrain section is the recipe and whose data section names the target splits the base is
    scored on."""
    parser = argparse.ArgumentParser(prog="grpo-speech pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file of config overrides (see grpo_speech/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. pretrain.steps=50")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))  # exits 2, as the trainer's command line does on a bad value


def ctc_targets(text: str) -> list[int]:
    return [CTC_INDEX[c] for c in " ".join(text.lower().split()) if c in CTC_INDEX]


def encoder_frames(seconds: float) -> int:
    """Encoder frames of a clip: mel frames n // 160 + 1 at 16 kHz, stacked in pairs (Granite Speech's feature extractor)."""
    return (round(seconds * 16000) // 160 + 1) // 2


def load_pretrain_data(work_dir: Path, n_train: int, n_val: int, n_test: int) -> dict[str, dict[str, list[dict]]]:
    """{source: {"train"/"test": examples}} with each example's spoken text under "transcript"."""
    out = {}
    for name, task, domain, seed in SOURCES:
        root = work_dir / "data" / name
        synthesize(task, str(root), n_train, n_val, n_test, seed, domain=domain)
        spoken = {}
        for split in ("train", "test"):
            with open(root / f"{split}.jsonl", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    spoken[row["id"]] = spoken_text(task, row)
        out[name] = {}
        for split in ("train", "test"):
            examples = load_synthetic(root, split, task, RowChecker(False, 30.0)).examples
            for ex in examples:
                ex["transcript"] = spoken[ex["id"]]
            out[name][split] = examples
    return out


def as_asr(ex: dict) -> dict:
    """An example of any source as a transcription example of its own speech."""
    return {**ex, "task": "asr", "prompt_fields": {}, "reference": ex["transcript"]}


def task_batches(train: dict[str, list[dict]], p: PretrainConfig, words_only: bool, asr_share: float,
                 rng: random.Random) -> dict[str, list[list[dict]]]:
    """{task: batches} of one epoch. Each ast/sqa clip serves ASR with chance `asr_share`; word
    lists are always ASR, and alone in the first phase (words_only). A batch holds one task (its
    prompts come from that task's pretrain templates) and clips of similar length (less padding:
    the conformer has no attention mask)."""
    words = [as_asr(ex) for ex in train["words"]]
    by_task = {"asr": words if words_only else list(train["asr"]) + words, "ast": [], "sqa": []}
    for name in ("ast", "sqa"):
        for ex in ([] if words_only else train[name]):
            if rng.random() < asr_share:
                by_task["asr"].append(as_asr(ex))
            else:
                by_task[name].append(ex)
    B, pool = p.batch_size, p.batch_size * 16
    out = {}
    for task, items in by_task.items():
        rng.shuffle(items)
        out[task] = []
        for i in range(0, len(items), pool):
            by_length = sorted(items[i:i + pool], key=lambda ex: ex["seconds"])
            out[task] += [by_length[j:j + B] for j in range(0, len(by_length) - B + 1, B)]
    return out


def epoch_batches(train: dict[str, list[dict]], epoch: int, p: PretrainConfig, words_only: bool) -> list[list[dict]]:
    """Batches of one epoch of the first two phases, every task's shuffled together, seeded by
    (seed, epoch): the tasks' shares follow their clip counts and asr_share."""
    rng = random.Random(step_seed(p.seed, "pretrain-epoch", epoch, words_only))
    batches = [b for task_list in task_batches(train, p, words_only, p.asr_share, rng).values()
               for b in task_list]
    rng.shuffle(batches)
    return batches


def instruct_batches(train: dict[str, list[dict]], p: PretrainConfig):
    """Endless batches of the last phase with an instruct_mix: each step draws its task by the
    mix's weights and takes that task's next batch from its own run of epochs (ast and sqa clips
    all serve their own task there; ASR reads the asr clips and the word lists)."""
    mix = parse_mix(p.instruct_mix)
    rng = random.Random(step_seed(p.seed, "pretrain-instruct"))
    queues = {task: [] for task in mix}
    epochs = dict.fromkeys(mix, 0)
    while True:
        task = rng.choices(list(mix), weights=list(mix.values()))[0]
        if not queues[task]:
            epoch_rng = random.Random(step_seed(p.seed, "pretrain-instruct-epoch", task, epochs[task]))
            queues[task] = task_batches(train, p, False, 0.0, epoch_rng)[task][::-1]
            epochs[task] += 1
        yield queues[task].pop()


def batch_schedule(train, p: PretrainConfig):
    """(step, batch) for every step, the same on every run: a resumed run skips the done steps.
    Phases: word lists (words_steps), every task by clip counts, and with instruct_mix a last
    phase (instruct_share) whose tasks follow the mix."""
    words_steps = int(p.words_steps * p.steps)
    mixed_from = first_instruct_step(p) if parse_mix(p.instruct_mix) else p.steps
    step, epoch = 0, 0
    while step < mixed_from:
        words_only = step < words_steps
        for batch in epoch_batches(train, epoch, p, words_only):
            if step >= mixed_from or (words_only and step >= words_steps):
                break
            yield step, batch
            step += 1
        epoch += 1
    for step, batch in zip(range(mixed_from, p.steps), instruct_batches(train, p)):
        yield step, batch


def answer_logits(model, tokenizer, prompt_BT, attn_BT, references: list[str], **audio):
    """(logits_BLV, ids_BT, mask_BT): the model on prompt + answer (teacher forcing), L = Tp + T
    positions for a prompt of Tp tokens. Position Tp-1+t of the logits predicts answer token t. `audio`: input_features(_mask), if any."""
    ids_BT, mask_BT = tokenize_targets(references, tokenizer, max_new_tokens=200)
    attn_full_BT = torch.cat([attn_BT, mask_BT], dim=1)
    # Positions as rollout.py counts them: the first real token of a left-padded row is 0.
    pos_BT = (attn_full_BT.cumsum(-1) - 1).clamp(min=0)
    logits_BLV = model(input_ids=torch.cat([prompt_BT, ids_BT], dim=1), attention_mask=attn_full_BT,
                       position_ids=pos_BT, **audio).logits
    return logits_BLV, ids_BT, mask_BT


def answer_ce(logits_BLV, ids_BT, mask_BT) -> torch.Tensor:
    """Token-mean cross-entropy of the answers (the prompt gets no loss): the trainer's SFT loss
    on log-probs taken from the full logits, which the audio-position CTC needs anyway."""
    Tp, T = logits_BLV.shape[1] - ids_BT.shape[1], ids_BT.shape[1]
    logp_BTV = F.log_softmax(logits_BLV[:, Tp - 1:Tp - 1 + T].float(), dim=-1)
    loss, _ = sft_loss(logp_BTV.gather(-1, ids_BT[..., None])[..., 0], mask_BT)
    return loss


def first_instruct_step(p: PretrainConfig) -> int:
    """The first step of the last phase (instruct_share); `steps` when there is none."""
    return p.steps - int(round(p.instruct_share * p.steps))


def prompt_domain(step: int, p: PretrainConfig) -> str:
    """The prompt wordings of a step: "pretrain-wide" in the last instruct_share of the steps."""
    return "pretrain-wide" if step >= first_instruct_step(p) else "pretrain"


def text_translation_ce(model, tokenizer, pairs: list[tuple[str, str]], rng: random.Random,
                        domain: str = "pretrain") -> torch.Tensor:
    """Answer cross-entropy of text-only translation: the English sentence stands where the audio
    would be in a pretraining ast prompt, the German sentence is the answer. The LM of a speech
    model learned its languages from text; this is the tiny base's share of that."""
    prompts = [chat_prompt(tokenizer, rng.choice(templates_for("ast", domain)).replace(AUDIO, en))
               for en, _ in pairs]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return answer_ce(*answer_logits(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                    [de for _, de in pairs]))


def loss_on_batch(model, processor, examples: list[dict], rng: random.Random, ctc_weight: float,
                  audio_ctc_weight: float = 0.0, domain: str = "pretrain"):
    """(loss, metrics) of one single-task batch: answer cross-entropy + ctc_weight * CTC, the CTC
    loss being the mean of the encoder's mid-layer and top-layer character CTC, + audio_ctc_weight
    * token CTC of the transcript read from the LM's own logits at the audio positions. `domain`:
    whose prompt wordings ("pretrain" or "pretrain-wide")."""
    tok = processor.tokenizer
    batch = collate(examples, processor, rng=rng, templates=templates_for(examples[0]["task"], domain))
    prompt_BT = batch["input_ids"]
    Tp = prompt_BT.shape[1]  # prompt length (P is the glossary's prompt count)

    enc = model.model.encoder
    captured = {}
    # The encoder applies its CTC head `out` once, at the mid layer (self-conditioning), and
    # returns neither those logits nor the top layer's: hooks catch them.
    # (A hook that returns something replaces the module's output: these return None.)
    h_mid = enc.out.register_forward_hook(lambda m, i, o: captured.update(mid=o))
    h_top = enc.register_forward_hook(lambda m, i, o: captured.update(top=o.last_hidden_state))
    try:
        logits_BTV, ids_BT, mask_BT = answer_logits(
            model, tok, prompt_BT, batch["attention_mask"], batch["references"],
            input_features=batch["input_features"], input_features_mask=batch["input_features_mask"])
    finally:
        h_mid.remove()
        h_top.remove()
    ce = answer_ce(logits_BTV, ids_BT, mask_BT)

    F_max = captured["mid"].shape[1]
    frames_B = torch.tensor([min(encoder_frames(ex["seconds"]), F_max) for ex in examples])
    targets = [torch.tensor(ctc_targets(ex["transcript"]), dtype=torch.long) for ex in examples]
    target_len_B = torch.tensor([len(t) for t in targets])
    ctc = 0.0
    for logits_BFC in (captured["mid"], enc.out(captured["top"])):
        logp_FBC = F.log_softmax(logits_BFC.float(), dim=-1).transpose(0, 1)
        ctc = ctc + F.ctc_loss(logp_FBC, torch.cat(targets), frames_B, target_len_B, blank=0,
                               reduction="mean", zero_infinity=True) / 2
    loss = ce + ctc_weight * ctc
    metrics = {"loss/ce": ce.item(), "loss/ctc": ctc.item(), "tokens": int(mask_BT.sum())}
    if audio_ctc_weight:
        audio_ctc = audio_token_ctc(logits_BTV[:, :Tp], prompt_BT == model.config.audio_token_id,
                                    [ex["transcript"] for ex in examples], tok)
        loss = loss + audio_ctc_weight * audio_ctc
        metrics["loss/audio_ctc"] = audio_ctc.item()
    return loss, metrics


def audio_token_ctc(logits_BTV: torch.Tensor, audio_BT: torch.Tensor, transcripts: list[str], tokenizer):
    """CTC of each clip's transcript (the LM's own BPE tokens) against the LM's logits at that
    clip's audio positions, with <|end_of_text|> as the blank (nothing is ever sampled at a prompt
    position, so the blank costs the answer nothing).

    Why: trained on answers alone, the projector's output collapses to one vector per query slot
    (cosine 1.000 between the audio embeddings of different clips) and the LM learns a language
    model that ignores the audio. Asking the LM to name, at the audio positions, the tokens being
    spoken gives the projector and the LM a direct, dense signal to carry and read the content."""
    n_audio_B = audio_BT.sum(-1)
    A = int(n_audio_B.max())
    # Audio tokens are contiguous in each row: gather them left-aligned into B x A.
    order_BT = torch.argsort((~audio_BT).to(torch.int8), dim=-1, stable=True)[:, :A]
    logits_BAV = logits_BTV.gather(1, order_BT[..., None].expand(-1, -1, logits_BTV.shape[-1]))
    logp_ABV = F.log_softmax(logits_BAV.float(), dim=-1).transpose(0, 1)
    targets = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
               for t in transcripts]
    target_len_B = torch.tensor([len(t) for t in targets])
    return F.ctc_loss(logp_ABV, torch.cat(targets), n_audio_B, target_len_B,
                      blank=tokenizer.eos_token_id, reduction="mean", zero_infinity=True)


def word_errors(hyp: str, ref: str) -> int:
    """Word-level edit distance (lowercased, punctuation stripped), for WER."""
    h, r = ctc_words(hyp), ctc_words(ref)
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, start=1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[len(h)]


def ctc_words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c in CTC_INDEX).split()


@torch.no_grad()
def generate(model, processor, examples: list[dict], templates: list[str], *, temperature: float,
             top_p: float, seed: int, batch_size: int = 32) -> list[str]:
    """One completion per example (temperature 0: greedy), seeded, in example order."""
    texts = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], processor,
                        rng=random.Random(step_seed(seed, "pretrain-generate", start)), templates=templates)
        gen = torch.Generator().manual_seed(step_seed(seed, "pretrain-generate", start))
        texts += sample_groups(model, batch, group_size=1, max_new_tokens=120, temperature=temperature,
                               top_p=top_p, tokenizer=processor.tokenizer, generator=gen).texts
    return texts


@torch.no_grad()
def audio_similarity(model, processor, examples: list[dict]) -> float:
    """Mean cosine between the audio embeddings of different clips at the same position (over
    the first 10 positions of consecutive pairs of clips): near 1 means the projector's output no
    longer depends on the audio, and nothing downstream can read it."""
    batch = collate(examples, processor, rng=random.Random(0), templates=templates_for("asr", "pretrain"))
    audio_PAH = encode_audio(model, batch)
    unit_PAH = F.normalize(audio_PAH[:, :10].float(), dim=-1)
    return float((unit_PAH[:-1] * unit_PAH[1:]).sum(-1).mean())


@torch.no_grad()
def probe(model, processor, examples: list[dict]) -> dict:
    """Does the LM read the audio? Held-out ASR answer cross-entropy with each clip's own audio
    and with silence (all-zero features) in its place, and the audio-embedding cosine between
    clips. A model that reads the audio has ce_right far below ce_silent."""
    was_training = model.training
    model.eval()
    out = {"probe/audio_cosine": audio_similarity(model, processor, examples[:16])}
    for name, mute in (("probe/ce_right", False), ("probe/ce_silent", True)):
        total = 0.0
        for start in range(0, len(examples), 16):
            part = examples[start:start + 16]
            total += len(part) * probe_ce(model, processor, part, mute=mute).item()
        out[name] = total / len(examples)
    model.train(was_training)
    return out


def probe_ce(model, processor, examples: list[dict], mute: bool = False) -> torch.Tensor:
    """Answer cross-entropy of one batch (pretrain prompts), optionally with silence for audio."""
    batch = collate(examples, processor, rng=random.Random(0), templates=templates_for(examples[0]["task"], "pretrain"))
    features = batch["input_features"] * 0 if mute else batch["input_features"]
    return answer_ce(*answer_logits(model, processor.tokenizer, batch["input_ids"], batch["attention_mask"],
                                    batch["references"], input_features=features,
                                    input_features_mask=batch["input_features_mask"]))


@torch.no_grad()
def evaluate_base(model, processor, data, cfg: Config) -> tuple[dict, dict]:
    """(scores, examples of outputs): WER on held-out ASR clips (greedy, pretrain prompts), and
    BLEU on the TARGET test splits of ast and sqa (target prompts), sampled (T 0.9, top-p 0.9,
    as the paper evaluates) and greedy, against the one reference and against every correct
    answer (`_all_refs`). pretrain.eval_n examples of each."""
    n, seed = cfg.pretrain.eval_n, cfg.pretrain.seed
    scores, shown = {}, {}
    held = data["asr"]["test"][:n]
    scores["audio/cosine_between_clips"] = audio_similarity(model, processor, held[:16])
    hyps = generate(model, processor, held, templates_for("asr", "pretrain"), temperature=0, top_p=1.0, seed=seed)
    errors = sum(word_errors(h, ex["reference"]) for h, ex in zip(hyps, held))
    scores["asr/wer"] = 100.0 * errors / max(1, sum(len(ctc_words(ex["reference"])) for ex in held))
    shown["asr"] = [(ex["reference"], h) for ex, h in zip(held[:3], hyps[:3])]
    for task in ("ast", "sqa"):
        test = load_split(replace(cfg, task=task), "test").examples[:n]
        refs = [ex["reference"] for ex in test]
        for mode, temperature, top_p in (("sampled", 0.9, 0.9), ("greedy", 0.0, 1.0)):
            hyps = generate(model, processor, test, templates_for(task), temperature=temperature,
                            top_p=top_p, seed=seed)
            scores[f"{task}/bleu_{mode}"] = sacrebleu.corpus_bleu(hyps, [refs]).score
            scores[f"{task}/bleu_{mode}_all_refs"] = multi_reference_bleu(
                hyps, refs, [ex["alternatives"] for ex in test])
            if mode == "greedy":
                shown[task] = [(ex["prompt_fields"].get("question", ""), ex["reference"], h)
                               for ex, h in zip(test[:3], hyps[:3])]
    return scores, shown


def translation_pairs(cfg: Config) -> list[tuple[str, str]]:
    """Text-only (English, German) pairs of the pretrain domain, minus any English sentence of the
    target ast validation or test split (the base must not have seen those, even as text)."""
    d = cfg.data
    # The synthetic splits draw test first, then validation (synth.py): their texts, no audio.
    held_out = {row["sentence"] for row in task_texts("ast", d.n_test + d.n_val, d.synth_seed)}
    pairs = sentence_pairs(cfg.pretrain.n_text, step_seed(cfg.pretrain.seed, "pretrain-text-pairs"), "pretrain")
    return [(en, de) for en, de in pairs if en not in held_out]


def build_base(p: PretrainConfig, tokenizer):
    """The tiny Granite Speech of the recipe's sizes, with the projector initialised to pass audio
    content (Granite's initialisation does not; see below)."""
    sizes = dict(context_size=p.context_size, lm_hidden=p.lm_hidden, lm_layers=p.lm_layers,
                 lm_intermediate=3 * p.lm_hidden, enc_layers=p.enc_layers,
                 enc_output_dim=len(CTC_CHARS) + 1,
                 dropout=0.0,  # few epochs: no dropout, and faster
                 proj_window=p.proj_window, proj_downsample=p.proj_downsample,
                 embedding_multiplier=p.embedding_multiplier, residual_multiplier=p.residual_multiplier,
                 attention_multiplier=p.attention_multiplier, rope_theta=p.rope_theta)
    model, processor = build_tiny_model(tokenizer, **sizes)
    # With the Granite initialisation (std 0.02) the Q-Former's output is its learned query plus a
    # cross-attention term about 50x smaller: measured here, the audio embeddings of two different
    # clips have cosine 0.999 at initialisation, and training on answers never recovers (1.000
    # after 2000 steps, the LM learns to ignore the audio). std 0.1 gives cosine 0.78 at the start.
    for module in model.model.projector.qformer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=p.qformer_init_std)
    # The Q-Former's output is layer-normed (std 1 per dimension); Granite's init of the final
    # linear (std 0.02) makes the audio embeddings 11x larger than the token embeddings, and in
    # the LM's residual stream the raw audio embedding then drowns what the layers add at the
    # audio positions: they cannot combine neighbouring positions into words.
    linear = model.model.projector.linear
    torch.nn.init.normal_(linear.weight, std=p.projector_out_std / linear.in_features ** 0.5)
    torch.nn.init.zeros_(linear.bias)
    return model, processor


def main(argv: list[str] | None = None) -> dict:
    """The recipe, stage by stage; returns the report written beside the base (pretrain.json)."""
    # 0. The settings (the config's pretrain section), claimed for work_dir.
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    p = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    t_start = time.time()
    work = Path(p.work_dir)
    options = claim_work_dir(work, p)

    # 1. Data (synthesized once, then read from work_dir/data), the tokenizer (deterministic) and
    #    the text-only translation pairs.
    data = load_pretrain_data(work, p.n_train, p.n_val, p.n_test)
    corpus = [text for task in ("ast", "sqa") for domain in ("target", "pretrain")
              for text in text_corpus(task, 4000, step_seed(p.seed, "pretrain-corpus"), domain)]
    tokenizer = build_tokenizer(corpus, p.vocab_size)
    text_pairs = translation_pairs(cfg) if p.text_batch else []

    # 2. The model from scratch, seeded, its optimiser, and the step a killed run reached.
    model, processor, opt, sched, first = build_training(p, tokenizer, work)
    print(f"pretrain: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters, "
          f"{sum(len(data[name]['train']) for name in data)} clips, {p.steps} steps of {p.batch_size}")

    # 3. Train.
    train_steps(model, processor, data, text_pairs, opt, sched, p, work=work, first=first, t_start=t_start)
    train_minutes = (time.time() - t_start) / 60

    # 4. Evaluate, then write the base model with the recipe that made it.
    return write_base(model, processor, data, cfg, options, argv, t_start=t_start, train_minutes=train_minutes)


def claim_work_dir(work: Path, p: PretrainConfig) -> dict:
    """The recipe's settings (`out` resolved), saved as work_dir/options.json. A work_dir holding
    checkpoints made with other settings is refused: its steps would be resumed under these."""
    work.mkdir(parents=True, exist_ok=True)
    options = {**dataclasses.asdict(p), "out": p.out or str(DEFAULT_OUT)}
    saved = work / "options.json"
    if latest_checkpoint(work / "ckpt") is not None and json.loads(saved.read_text()) != options:
        raise UserError(f"{work}: holds checkpoints of a run with other settings ({saved}); "
                        "use another pretrain.work_dir or delete it")
    saved.write_text(json.dumps(options, indent=1) + "\n")
    return options


def build_training(p: PretrainConfig, tokenizer, work: Path):
    """(model, processor, optimiser, schedule, first step): the model built from the seed, AdamW
    with the projector and LM at lm_lr_mult times the encoder's rate, the warm-up and cosine
    schedule; restored from work_dir's checkpoint when a killed run left one (first step > 0)."""
    torch.manual_seed(step_seed(p.seed, "pretrain-init"))
    model, processor = build_base(p, tokenizer)
    enc_params = [q for n, q in model.named_parameters() if n.startswith("model.encoder.")]
    rest = [q for n, q in model.named_parameters() if not n.startswith("model.encoder.")]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": p.lr},
                             {"params": rest, "lr": p.lr * p.lm_lr_mult}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, p.steps, p.warmup))
    first = 0
    ckpt = latest_checkpoint(work / "ckpt")
    if ckpt is not None:
        first = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)["step"]
        print(f"resumed from {ckpt} at step {first}")
    return model, processor, opt, sched, first


def step_loss(model, processor, examples: list[dict], text_pairs, p: PretrainConfig, step: int,
              domain: str):
    """(loss, metrics) of one step: its batch (loss_on_batch) and text_batch text-only pairs."""
    loss, m = loss_on_batch(model, processor, examples, random.Random(step_seed(p.seed, "pretrain-wording", step)),
                            p.ctc_weight, p.audio_ctc_weight, domain)
    if text_pairs:
        rng = random.Random(step_seed(p.seed, "pretrain-text", step))
        text_ce = text_translation_ce(model, processor.tokenizer, rng.sample(text_pairs, p.text_batch), rng,
                                      domain)
        loss = loss + text_ce
        m["loss/text_ce"] = text_ce.item()
    return loss, m


def train_steps(model, processor, data, text_pairs, opt, sched, p: PretrainConfig, *, work: Path,
                first: int, t_start: float) -> None:
    """The steps from `first` on, each a line of work_dir/log.jsonl; every 25 a console line, every
    save_every the audio-reading probe (logged and printed) and a checkpoint (not at the end)."""
    model.train()
    train = {name: data[name]["train"] for name in data}
    t0, seen = time.time(), 0
    with open(work / "log.jsonl", "a") as log:
        for step, examples in batch_schedule(train, p):
            if step < first:
                continue
            domain = prompt_domain(step, p)
            loss, m = step_loss(model, processor, examples, text_pairs, p, step, domain)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if step < p.projector_frozen * p.steps:
                for q in model.model.projector.parameters():
                    q.grad = None  # AdamW leaves parameters without a gradient untouched
            opt.step()
            sched.step()
            seen += len(examples)
            record = {"step": step + 1, "task": examples[0]["task"], "prompts": domain, **m,
                      "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                      "utt_per_s": seen / (time.time() - t0)}
            log.write(json.dumps(record) + "\n")
            if (step + 1) % 25 == 0:
                log.flush()
                print(f"step {step + 1}/{p.steps} {record['task']} ce {m['loss/ce']:.3f} "
                      f"ctc {m['loss/ctc']:.3f} text {m.get('loss/text_ce', 0):.3f} "
                      f"audio-ctc {m.get('loss/audio_ctc', 0):.3f} {record['utt_per_s']:.0f} utt/s "
                      f"{(time.time() - t_start) / 60:.1f} min", flush=True)
            if (step + 1) % p.save_every == 0:
                probed = {"step": step + 1, **probe(model, processor, data["asr"]["test"][:32])}
                log.write(json.dumps(probed) + "\n")
                print("  ".join(f"{k} {v:.3f}" for k, v in probed.items()), flush=True)
                if step + 1 < p.steps:
                    save_checkpoint(work / "ckpt", step=step + 1, model=model, optimizer=opt, scheduler=sched,
                                    extra={}, keep=1)


def write_base(model, processor, data, cfg: Config, options: dict, argv: list[str], *, t_start: float,
               train_minutes: float) -> dict:
    """Score the base (evaluate_base, unless pretrain.eval_n is 0), write it to `out` with
    pretrain.json beside it: the command, the settings, the scores and a few outputs."""
    model.eval()
    scores, shown = evaluate_base(model, processor, data, cfg) if cfg.pretrain.eval_n else ({}, {})
    for k, v in scores.items():
        print(f"{k}: {v:.2f}")
    for task, rows in shown.items():
        for row in rows:
            print(f"[{task}] " + " | ".join(row))
    out = options["out"]
    save_model(model, processor, out)
    n_params = sum(q.numel() for q in model.parameters())
    report = {"command": "python -m grpo_speech pretrain " + " ".join(argv),
              "options": {**options, "out": _shown_path(out)}, "parameters": n_params,
              "train_minutes": round(train_minutes, 1),
              "total_minutes": round((time.time() - t_start) / 60, 1), "scores": scores,
              "examples": shown, "torch_threads": torch.get_num_threads()}
    (Path(out) / "pretrain.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({n_params / 1e6:.2f} M parameters, {train_minutes:.1f} min of training)")
    return report


if __name__ == "__main__":
    main()
