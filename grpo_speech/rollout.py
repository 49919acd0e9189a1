"""Group rollout for GRPO: G completions per spoken prompt, each clip encoded once.

Peers call `generate(num_return_sequences=G)`, which runs every clip G times through the
encoder and prefills the prompt G times. Here a clip goes through encoder + projector once, the
prompt is prefilled once, and its KV cache is shared by the G samples. The audio embeddings are
returned so the policy, old and reference log-prob passes reuse them.
Row p*G+g of every (B, ...) tensor belongs to prompt p (`expand_to_group`).

One decode loop (`_decode`: sample, write, "all done?", keep the live rows, step) runs over one
of two engines, each a `step(tokens_R) -> logits_RV` and a `keep(rows_n)`:
- "static" (the default, static_decode.py): a preallocated KV cache and a hand-written Granite
  step, replayed as CUDA graphs on CUDA. Finished rows step on, masked, until the "all done?"
  check every `check_every` steps, the only host sync, moves the live rows to a smaller bucket.
- "dynamic" (`DynamicDecoder`): transformers' decoder forward with its growing cache; it syncs
  every step, and finished rows leave at once. Kept as the reference and for other decoders.
A row's tokens depend on its own logits and noise only, so both give the same tokens for a seed.
Under torch.distributed every rank steps until no row is alive on ANY rank, since every decode
step under FSDP is a collective.

    python -m grpo_speech bench rollout --device cuda      # against generate(), on the 2B shape
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from grpo_speech.distributed import any_rank, root_call
from grpo_speech.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from grpo_speech.model import decoder, logit_scale, lm_head_weight, speech_adapter
from grpo_speech.prefix import prompts_of_groups, shared_prefix_hidden
from grpo_speech.static_decode import static_decoder, static_supported


@dataclass
class Rollout:
    completion_ids_BT: torch.Tensor
    """(B, T) sampled tokens, right padded with the pad id; B = P*G, row p*G+g is prompt p."""
    mask_BT: torch.Tensor
    """(B, T) 1 for generated tokens (including the EOS that ended the row), 0 after."""
    logprobs_BT: torch.Tensor
    """(B, T) fp32 sampling-time log-probs log_softmax(logits / temperature) at the tokens (the
    full softmax, before top-p and the <|audio|> ban: the quantity sequence_logprobs computes).
    Training does not read them: it scores every pass with sequence_logprobs, so that the old and
    new log-probs of the ratio come from the same computation. They are kept as the check that
    sampling and scoring agree (tests/test_rollout.py); zeros on reference-answer rows."""
    texts: list[str]
    """B decoded completions without special tokens."""
    off_policy_B: torch.Tensor
    """(B,) bool: True for rows not sampled from the policy (MP-GRPO reference answers)."""
    audio_embeds: torch.Tensor | None
    """(P, A, H) projected audio embeddings, one row per prompt, to reuse in log-prob passes."""
    decode_path: str = "dynamic"
    """Which decode engine ran: "static+cuda-graphs", "static eager" or "dynamic"."""


def expand_to_group(x: torch.Tensor, G: int) -> torch.Tensor:
    """(P, ...) -> (P*G, ...) with row p*G+g a copy of row p. The only place prompts meet groups:
    audio, text, masks and the KV cache all go through it (r1-aqa paired audio with the wrong
    prompt by using .repeat for one and .repeat_interleave for the other)."""
    return x.repeat_interleave(G, dim=0)


def _positions(attention_BT: torch.Tensor) -> torch.Tensor:
    # Left padding: the first real token is position 0, as generate() does.
    return (attention_BT.long().cumsum(-1) - 1).masked_fill(attention_BT == 0, 0)


def _has_audio(batch) -> bool:
    return batch.get("input_features") is not None


def audio_trainable(model) -> bool:
    """True when encoder or projector train: their embeddings then differ between the policy and
    the reference, and the policy pass must re-encode to get gradients."""
    return any(p.requires_grad for m in (model.model.encoder, model.model.projector) for p in m.parameters())


@root_call
def encode_audio(model, batch) -> torch.Tensor | None:
    """(P, A, H) audio embeddings: encoder + projector, once per clip. None for text-only batches."""
    if not _has_audio(batch):
        return None
    features_PFM = batch["input_features"].to(model.device, model.dtype)
    return model.get_audio_features(features_PFM, return_dict=True).pooler_output


def _prompt_embeds(model, batch, audio_embeds_PAH) -> torch.Tensor:
    """(P, Tp, H) input embeddings of the prompts with the audio scattered into <|audio|> slots."""
    ids_PT = batch["input_ids"].to(model.device)
    if audio_embeds_PAH is None:
        return model.get_input_embeddings()(ids_PT)
    mask = batch.get("input_features_mask")
    mask = mask.to(model.device) if mask is not None else None
    return model.model.get_merged_audio_embeddings(ids_PT, audio_embeds_PAH, mask)


def _race_noise(B: int, V: int, generator, device, noise_rows: tuple | None = None) -> torch.Tensor:
    """(B, V) Exp(1) noise, one row per ORIGINAL row of the rollout. Sampling is
    argmax(probs / noise), the exponential race that torch.multinomial itself runs for one sample,
    without its host syncs (validity checks). Drawing for all B rows every step, finished or not,
    makes a row's tokens independent of when the others end, so both decode engines, which drop or
    keep finished rows differently, give the same tokens for a seed.

    noise_rows = (rows_B, total): the B rows are rows `rows_B` of a rollout of `total` rows over
    all ranks. Every rank draws the noise of all `total` rows and keeps its own, so a row's tokens
    do not depend on how many ranks share the step: 1 process and N ranks sample alike."""
    if noise_rows is None:
        return torch.empty(B, V, device=device).exponential_(1.0, generator=generator)
    rows_B, total = noise_rows
    return torch.empty(total, V, device=device).exponential_(1.0, generator=generator)[rows_B]


def _sample(logits_BV, noise_BV, *, temperature, top_p, banned):
    """Next tokens (B,) and their log_softmax(logits / temperature) (B,) before any masking.
    noise_BV: (B, V) from `_race_noise` (None when greedy)."""
    t = temperature if temperature > 0 else 1.0
    logprobs_BV = torch.log_softmax(logits_BV / t, dim=-1)
    z_BV = (logits_BV / t).index_fill_(1, banned, float("-inf"))
    if temperature <= 0:
        tokens_B = z_BV.argmax(dim=-1)
    else:
        if top_p < 1.0:  # evaluation only: training samples at top_p = 1 without a V-wide sort
            # Keep the smallest set of top tokens whose mass reaches top_p: a token goes when the
            # mass strictly above it is already >= top_p (the top token always stays).
            sorted_BV, order_BV = z_BV.sort(dim=-1, descending=True)
            probs_BV = sorted_BV.softmax(dim=-1)
            above_BV = probs_BV.cumsum(dim=-1) - probs_BV
            sorted_BV = sorted_BV.masked_fill(above_BV >= top_p, float("-inf"))
            z_BV = torch.full_like(z_BV, float("-inf")).scatter_(1, order_BV, sorted_BV)
        tokens_B = (z_BV.softmax(dim=-1) / noise_BV).argmax(dim=-1)
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None])[:, 0]


@contextlib.contextmanager
def _weights_gathered(model, on: bool):
    """Under FSDP2, all-gather every unit once for the whole rollout and keep it gathered: the
    decode steps then issue no collectives, the static step can call the layers' modules directly,
    and CUDA graphs see plain tensors at fixed addresses. Each unit's reshard-after-forward setting
    is restored and the units resharded after. Costs the unsharded weights' memory during the
    rollout (about 5 GB for the 2B model in bf16). A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if on else []
    saved = []
    try:
        for m in units:
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None and m is not model:
                # post_forward_mesh_info None is what set_reshard_after_forward(False) sets; saved to
                # restore exactly (the root keeps its own special value and is not resharded here).
                saved.append((m, group, group.post_forward_mesh_info))
                group.post_forward_mesh_info = None
            m.unshard()
        yield
    finally:
        for m, group, info in saved:
            group.post_forward_mesh_info = info
            m.reshard()


@root_call
@torch.no_grad()
def sample_groups(model, batch, *, group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, tokenizer, eos_token_id: int | None = None,
                  generator: torch.Generator | None = None, min_new_tokens: int = 0,
                  sampler: str = "auto", check_every: int = 8, cuda_graphs: bool = True,
                  gather_weights: bool = True, noise_rows: tuple | None = None) -> Rollout:
    """Sample `group_size` completions for each of the P prompts in `batch` (collated by the
    processor: input_ids, attention_mask left padded, input_features, input_features_mask).

    temperature 0 is greedy (equal to generate(do_sample=False)). `<|audio|>` is never sampled.
    EOS ends a row (its later positions are masked). min_new_tokens bans EOS before that many
    tokens (benchmarks). `generator` lives on the model's device.

    sampler: the decode engine. "static" (preallocated KV cache, CUDA graphs on CUDA unless
    cuda_graphs=False; a failed capture is an error), "dynamic" (transformers' cache, finished
    rows dropped each step) or "auto" (static where the decoder is supported, else dynamic).
    check_every: steps between the static engine's "all done?" checks, the loop's only host syncs
    (and, under torch.distributed, its only all-reduces); the dynamic engine checks every step.
    gather_weights=False keeps FSDP2's per-layer gathering during the rollout (dynamic only).
    noise_rows=(rows_B, total): where the P*G rows sit in the step's rollout over all ranks
    (`_race_noise`); None: they are all of it.
    """
    if sampler not in ("auto", "static", "dynamic"):
        raise ValueError(f"sampler = {sampler!r}: expected auto, static or dynamic")
    if sampler == "auto":
        sampler = "static" if static_supported(model) else "dynamic"
    if sampler == "static" and not gather_weights:
        raise ValueError("the static sampler calls the layers directly: it needs gather_weights=True")
    model.eval()  # dropout off: samples come from the policy the log-prob passes see
    speech_adapter(model, True)
    G, eos = group_size, eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    with _weights_gathered(model, gather_weights):
        audio_embeds_PAH = encode_audio(model, batch)
        embeds_PTH = _prompt_embeds(model, batch, audio_embeds_PAH)
        attn_PT = batch["attention_mask"].to(model.device)
        pos_PT = _positions(attn_PT)
        # 1. Prefill once per prompt (P rows, not P*G).
        out = decoder(model)(inputs_embeds=embeds_PTH, attention_mask=attn_PT, position_ids=pos_PT, use_cache=True)
        logits_PV = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float() / logit_scale(model)
        # 2. The engine takes each prompt's K/V for its G rows; the static one copies them.
        if sampler == "static":
            engine = static_decoder(model, out.past_key_values, attn_PT, pos_PT[:, -1], G=G,
                                    new_tokens=max_new_tokens, graphs=cuda_graphs)
        else:
            engine = DynamicDecoder(model, out.past_key_values, attn_PT, pos_PT[:, -1], G)
        del out
        # 3. Decode.
        ids_BT, mask_BT, logprobs_BT = _decode(
            engine, expand_to_group(logits_PV, G), N=max_new_tokens, temperature=temperature, top_p=top_p,
            audio_id=model.config.audio_token_id, min_new_tokens=min_new_tokens, eos=eos,
            generator=generator, check_every=check_every if sampler == "static" else 1,
            noise_rows=None if noise_rows is None else (noise_rows[0].to(attn_PT.device), noise_rows[1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    T = max(int(mask_BT.sum(dim=1).max()), 1)
    ids_BT = ids_BT[:, :T].masked_fill(mask_BT[:, :T] == 0, pad)
    mask_BT, logprobs_BT = mask_BT[:, :T], logprobs_BT[:, :T]
    texts = tokenizer.batch_decode(ids_BT, skip_special_tokens=True)
    B = ids_BT.shape[0]
    return Rollout(ids_BT, mask_BT, logprobs_BT, texts, torch.zeros(B, dtype=torch.bool, device=ids_BT.device),
                   audio_embeds_PAH, engine.path)


def _decode(engine, logits_BV, *, N, temperature, top_p, eos, audio_id, generator, min_new_tokens,
            check_every, noise_rows=None):
    """The decode loop over either engine: (ids_BT, mask_BT, logprobs_BT) of N steps for B rows.

    logits_BV: each row's logits after its prompt. The loop holds R rows (rows_R of the B) and
    feeds their tokens to `engine.step`. A row's tokens depend only on its own logits and noise
    (`_race_noise`), so when rows leave the engine changes nothing in the output. Every
    `check_every` steps it counts live rows (a host sync): it ends when no rank has one, else the
    engine keeps the live rows if that lets it compute fewer (`engine.padded`); an idle rank
    keeps one finished row stepping, as long as the other ranks decode."""
    B, V = logits_BV.shape
    device = logits_BV.device
    banned_audio = torch.tensor([audio_id], device=device)  # never sampled
    banned_eos = torch.tensor([audio_id, eos], device=device)  # before min_new_tokens
    ids_BT = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs_BT = torch.zeros(B, N, dtype=torch.float32, device=device)
    mask_BT = torch.zeros(B, N, dtype=torch.long, device=device)
    rows_R = torch.arange(B, device=device)
    alive_R = torch.ones(B, dtype=torch.bool, device=device)  # finished rows step on, masked
    logits_RV = logits_BV
    for t in range(N):
        noise_RV = _race_noise(B, V, generator, device, noise_rows)[rows_R] if temperature > 0 else None
        tokens_R, lp_R = _sample(logits_RV, noise_RV, temperature=temperature, top_p=top_p,
                                 banned=banned_eos if t < min_new_tokens else banned_audio)
        # A finished row writes zeros where it already has zeros: masked writes without a sync.
        ids_BT[:, t].index_copy_(0, rows_R, tokens_R * alive_R)
        logprobs_BT[:, t].index_copy_(0, rows_R, torch.where(alive_R, lp_R, 0.0))
        mask_BT[:, t].index_copy_(0, rows_R, alive_R.long())
        alive_R = alive_R & (tokens_R != eos)
        if t == N - 1:
            break
        if (t + 1) % check_every == 0:
            # "All done?" is asked at the same steps on every rank: all leave together.
            live_n = alive_R.nonzero()[:, 0]
            n = live_n.shape[0]
            if not any_rank(n > 0):
                break
            if engine.padded(max(n, 1)) < engine.padded(rows_R.shape[0]):
                keep_n = live_n if n else live_n.new_zeros(1)
                engine.keep(keep_n)
                rows_R, tokens_R, alive_R = rows_R[keep_n], tokens_R[keep_n], alive_R[keep_n]
        logits_RV = engine.step(tokens_R)
    return ids_BT, mask_BT, logprobs_BT


class DynamicDecoder:
    """The dynamic engine: transformers' decoder forward with its growing cache, run eagerly. It
    computes only the loop's rows (`padded`); the loop checks it every step (check_every = 1: a
    launch-bound eager step gains nothing from fewer host syncs), so finished rows leave at once.
    Kept as the reference and for decoders the static step does not cover."""
    path = "dynamic"

    def __init__(self, model, cache, attn_PT: torch.Tensor, pos_P: torch.Tensor, G: int):
        self.model, self.lm, self.cache = model, decoder(model), cache
        self.head, self.scale = model.get_output_embeddings(), logit_scale(model)
        for layer in cache.layers:  # the prompt's prefill, shared by its G rows
            if type(layer) is not DynamicLayer:
                raise TypeError(f"cannot expand a {type(layer).__name__} cache layer to the group")
            layer.keys, layer.values = expand_to_group(layer.keys, G), expand_to_group(layer.values, G)
        self.attn_RT, self.pos_R1 = expand_to_group(attn_PT, G), expand_to_group(pos_P[:, None], G)

    @staticmethod
    def padded(n: int) -> int:
        return n

    def keep(self, rows_n: torch.Tensor) -> None:
        self.attn_RT, self.pos_R1 = self.attn_RT[rows_n], self.pos_R1[rows_n]
        self.cache.batch_select_indices(rows_n)

    def step(self, tokens_R: torch.Tensor) -> torch.Tensor:
        self.attn_RT = torch.cat([self.attn_RT, self.attn_RT.new_ones(self.attn_RT.shape[0], 1)], dim=1)
        self.pos_R1 = self.pos_R1 + 1
        embeds_R1H = self.model.get_input_embeddings()(tokens_R[:, None])
        out = self.lm(inputs_embeds=embeds_R1H, attention_mask=self.attn_RT, position_ids=self.pos_R1,
                      past_key_values=self.cache, use_cache=True)
        return self.head(out.last_hidden_state[:, -1]).float() / self.scale


@root_call
def sequence_logprobs(model, batch, audio_embeds, completion_ids_BT, mask_BT, *, group_size: int,
                      temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      rows_B: torch.Tensor | None = None, shared_prefix: bool = False) -> torch.Tensor:
    """(B, T) fp32 log-probs of the completions, teacher-forced over [prompt ; completion].

    batch: the P prompts (processor output); audio_embeds: (P, A, H) from the rollout, reused
    instead of re-encoding (None: encode now; re-encoded anyway when the encoder or projector train
    and gradients are on, so they get their gradient). completion_ids_BT / mask_BT: (B, T) rows of
    the P*G, or only the rows named by `rows_B` (micro-batches). Padded positions come back 0.
    Equals log_softmax(model(...).logits / temperature) at the completion tokens. The caller sets
    train/eval mode; the speech LoRA is switched on here.
    shared_prefix: run each prompt through the decoder once for its whole group (prefix.py; the
    same numbers up to rounding); rows_B must then hold whole groups. False: one [prompt ;
    completion] sequence per row, the reference the shared pass is tested against.
    """
    speech_adapter(model, True)
    device = model.device
    if _has_audio(batch) and (audio_embeds is None or (torch.is_grad_enabled() and audio_trainable(model))):
        audio_embeds = encode_audio(model, batch)
    embeds_PTH = _prompt_embeds(model, batch, audio_embeds)
    attn_PT = batch["attention_mask"].to(device)
    P, Tp = attn_PT.shape
    ids_BT, mask_BT = completion_ids_BT.to(device), mask_BT.to(device)
    T = ids_BT.shape[1]
    if shared_prefix and group_size > 1:
        prompts = prompts_of_groups(None if rows_B is None else rows_B.to(device), P, group_size)
        if ids_BT.shape[0] != prompts.shape[0] * group_size:
            raise ValueError(f"completion rows {ids_BT.shape[0]} != {prompts.shape[0]} groups x {group_size}")
        hidden_BTH = shared_prefix_hidden(decoder(model), embeds_PTH[prompts], attn_PT[prompts],
                                          model.get_input_embeddings()(ids_BT), mask_BT, group_size)
    else:
        prompt_B = expand_to_group(torch.arange(P, device=device), group_size)
        if rows_B is not None:
            prompt_B = prompt_B[rows_B.to(device)]
        if ids_BT.shape[0] != prompt_B.shape[0]:
            raise ValueError(f"completion rows {ids_BT.shape[0]} != prompts x group_size ({P} x {group_size})"
                             + (f" selected by rows_B ({prompt_B.shape[0]})" if rows_B is not None else ""))
        x_BTH = torch.cat([embeds_PTH[prompt_B], model.get_input_embeddings()(ids_BT)], dim=1)
        attn_BT = torch.cat([attn_PT[prompt_B], mask_BT.to(attn_PT.dtype)], dim=1)
        hidden_BLH = decoder(model)(inputs_embeds=x_BTH, attention_mask=attn_BT, position_ids=_positions(attn_BT),
                                    use_cache=False).last_hidden_state
        # The hidden state at position i predicts token i+1: the last prompt token predicts the first.
        hidden_BTH = hidden_BLH[:, Tp - 1: Tp - 1 + T]
    logprobs_BT = token_logprobs(hidden_BTH, lm_head_weight(model), ids_BT, logit_scale=logit_scale(model),
                                 temperature=temperature, chunk_size=chunk_size)
    return logprobs_BT * mask_BT


def tokenize_targets(texts: list[str], tokenizer, max_new_tokens: int):
    """(ids_BT, mask_BT): each text tokenized + EOS, truncated to max_new_tokens, right padded."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [(tokenizer(t, add_special_tokens=False).input_ids + [eos])[:max_new_tokens] for t in texts]
    T = max(max((len(r) for r in rows), default=1), 1)
    ids_BT = torch.full((len(rows), T), pad, dtype=torch.long)
    mask_BT = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids_BT[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask_BT[i, :len(r)] = 1
    return ids_BT, mask_BT


def add_reference_samples(rollout: Rollout, answers: list[list[str]] | list[str], tokenizer, *,
                          group_size: int, max_new_tokens: int) -> Rollout:
    """MP-GRPO: the last samples of each group become correct answers, tokenized (with EOS) and
    marked off-policy; their sampling log-probs are 0 (unused: the loss takes pi_phi = 1 for them).

    answers: per prompt, the texts to put in (the reference first, then any other correct answers;
    at most G - 1, so one sample stays on-policy): the reference goes to row G-1, the next to
    G-2, and so on. A plain list of strings is one answer (the reference) per prompt."""
    G = group_size
    B = rollout.completion_ids_BT.shape[0]
    answers = [[a] if isinstance(a, str) else list(a) for a in answers]
    if B != len(answers) * G:
        raise ValueError(f"add_reference_samples: {B} rows but {len(answers)} prompts x G={G}")
    if any(not 1 <= len(a) <= G - 1 for a in answers):
        raise ValueError(f"add_reference_samples: each prompt needs 1 to G-1={G - 1} answers, got "
                         f"{[len(a) for a in answers]}")
    rows = [p * G + (G - 1 - j) for p, a in enumerate(answers) for j in range(len(a))]
    texts_in = [t for a in answers for t in a]
    ref_ids_RT, ref_mask_RT = tokenize_targets(texts_in, tokenizer, max_new_tokens)
    device = rollout.completion_ids_BT.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    T = max(rollout.completion_ids_BT.shape[1], ref_ids_RT.shape[1])

    def widen(x_BT, fill):
        return torch.nn.functional.pad(x_BT, (0, T - x_BT.shape[1]), value=fill)

    ids_BT = widen(rollout.completion_ids_BT, pad).clone()
    mask_BT = widen(rollout.mask_BT, 0).clone()
    logprobs_BT = widen(rollout.logprobs_BT, 0.0).clone()
    off_B = rollout.off_policy_B.clone()
    rows_R = torch.tensor(rows, dtype=torch.long, device=device)
    ids_BT[rows_R] = widen(ref_ids_RT, pad).to(device)
    mask_BT[rows_R] = widen(ref_mask_RT, 0).to(device)
    logprobs_BT[rows_R] = 0.0
    off_B[rows_R] = True
    texts = list(rollout.texts)
    ref_texts = tokenizer.batch_decode(ref_ids_RT, skip_special_tokens=True)
    for r, row in enumerate(rows):
        texts[row] = ref_texts[r]
    return dataclasses.replace(rollout, completion_ids_BT=ids_BT, mask_BT=mask_BT, logprobs_BT=logprobs_BT,
                               texts=texts, off_policy_B=off_B)
