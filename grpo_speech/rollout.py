"""Group rollout for GRPO: G completions per spoken prompt, each clip encoded once.

Peers call `generate(num_return_sequences=G)`, which runs every clip G times through the
encoder and prefills the prompt G times. Here a clip goes through encoder + projector once, the
prompt is prefilled once, and its KV cache is expanded to the G samples. The audio embeddings
are returned so the policy, old and reference log-prob passes reuse them.
Row p*G+g of every (B, ...) tensor belongs to prompt p (`expand_to_group`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from grpo_speech import distributed
from grpo_speech.logprobs import token_logprobs
from grpo_speech.model import decoder, logit_scale, lm_head_weight, speech_adapter


@dataclass
class Rollout:
    completion_ids_BT: torch.Tensor
    """(B, T) sampled tokens, right padded with the pad id; B = P*G, row p*G+g is prompt p."""
    mask_BT: torch.Tensor
    """(B, T) 1 for generated tokens (including the EOS that ended the row), 0 after."""
    logprobs_BT: torch.Tensor
    """(B, T) fp32 sampling-time log-probs log_softmax(logits / temperature) at the tokens (the
    full softmax, before top-p and the <|audio|> ban: the quantity sequence_logprobs computes)."""
    texts: list[str]
    """B decoded completions without special tokens."""
    off_policy_B: torch.Tensor
    """(B,) bool: True for rows not sampled from the policy (MP-GRPO reference answers)."""
    audio_embeds: torch.Tensor | None
    """(P, A, H) projected audio embeddings, one row per prompt, to reuse in log-prob passes."""


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


def _sample(logits_BV, *, temperature, top_p, banned, generator):
    """Next tokens (B,) and their log_softmax(logits / temperature) (B,) before any masking."""
    t = temperature if temperature > 0 else 1.0
    logprobs_BV = torch.log_softmax(logits_BV / t, dim=-1)
    z_BV = (logits_BV / t).index_fill_(1, banned, float("-inf")) if len(banned) else logits_BV / t
    if temperature <= 0:
        tokens_B = z_BV.argmax(dim=-1)
    else:
        if top_p < 1.0:
            # Keep the smallest set of top tokens whose mass reaches top_p: a token goes when the
            # mass strictly above it is already >= top_p (the top token always stays).
            sorted_BV, order_BV = z_BV.sort(dim=-1, descending=True)
            probs_BV = sorted_BV.softmax(dim=-1)
            above_BV = probs_BV.cumsum(dim=-1) - probs_BV
            sorted_BV = sorted_BV.masked_fill(above_BV >= top_p, float("-inf"))
            z_BV = torch.full_like(z_BV, float("-inf")).scatter_(1, order_BV, sorted_BV)
        tokens_B = torch.multinomial(z_BV.softmax(dim=-1), 1, generator=generator)[:, 0]
    return tokens_B, logprobs_BV.gather(1, tokens_B[:, None])[:, 0]


def _expand_cache(cache, G: int) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cannot expand a {type(layer).__name__} cache layer to the group")
        layer.keys, layer.values = expand_to_group(layer.keys, G), expand_to_group(layer.values, G)


@torch.no_grad()
def sample_groups(model, batch, *, group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float = 1.0, tokenizer, eos_token_id: int | None = None,
                  generator: torch.Generator | None = None, min_new_tokens: int = 0) -> Rollout:
    """Sample `group_size` completions for each of the P prompts in `batch` (collated by the
    processor: input_ids, attention_mask left padded, input_features, input_features_mask).

    temperature 0 is greedy (equal to generate(do_sample=False)). `<|audio|>` is never sampled.
    EOS ends a row, and finished rows leave the decode batch (their KV cache rows are dropped), so
    they cost nothing more. min_new_tokens bans EOS before that many tokens (benchmarks).
    """
    model.eval()  # dropout off: samples come from the policy the log-prob passes see
    speech_adapter(model, True)
    G = group_size
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = model.device
    banned_audio = torch.tensor([model.config.audio_token_id], device=device)
    banned_eos = torch.tensor([model.config.audio_token_id, eos], device=device)

    audio_embeds_PAH = encode_audio(model, batch)
    embeds_PTH = _prompt_embeds(model, batch, audio_embeds_PAH)
    attn_PT = batch["attention_mask"].to(device)
    P = embeds_PTH.shape[0]
    lm, head, scale = decoder(model), model.get_output_embeddings(), logit_scale(model)

    # 1. Prefill once per prompt, then share its KV cache with the G samples.
    out = lm(inputs_embeds=embeds_PTH, attention_mask=attn_PT, position_ids=_positions(attn_PT), use_cache=True)
    cache = out.past_key_values
    _expand_cache(cache, G)
    logits_BV = expand_to_group(head(out.last_hidden_state[:, -1]).float() / scale, G)
    attn_BT = expand_to_group(attn_PT, G)
    pos_B1 = expand_to_group(_positions(attn_PT)[:, -1:], G)

    B = P * G
    ids_BT = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs_BT = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    mask_BT = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    alive_R = torch.arange(B, device=device)  # rows of the B still decoding
    dummy = False  # True once this rank's rows have all ended while another rank's go on
    # 2. Decode: R live rows at a time.
    for t in range(max_new_tokens):
        banned = banned_eos if t < min_new_tokens else banned_audio
        tokens_R, lp_R = _sample(logits_BV, temperature=temperature, top_p=top_p, banned=banned,
                                 generator=generator)
        if dummy:
            done_R = torch.zeros_like(tokens_R, dtype=torch.bool)
        else:
            ids_BT[alive_R, t], logprobs_BT[alive_R, t], mask_BT[alive_R, t] = tokens_R, lp_R, 1
            done_R = tokens_R == eos
        if t == max_new_tokens - 1:
            break
        # Lock-step (issue 11): under FSDP every forward is a collective, so a rank whose rows
        # have all ended keeps stepping one dummy row, its output discarded, until every rank's
        # rows have ended. One small all-reduce per step, none on a single process.
        if not distributed.any_rank(not dummy and not bool(done_R.all())):
            break
        if not dummy and bool(done_R.all()):
            dummy, done_R = True, torch.ones_like(done_R)
            done_R[0] = False
        if bool(done_R.any()):
            keep_R = (~done_R).nonzero()[:, 0]
            alive_R, tokens_R = alive_R[keep_R], tokens_R[keep_R]
            attn_BT, pos_B1 = attn_BT[keep_R], pos_B1[keep_R]
            cache.batch_select_indices(keep_R)
        attn_BT = torch.cat([attn_BT, attn_BT.new_ones(attn_BT.shape[0], 1)], dim=1)
        pos_B1 = pos_B1 + 1
        out = lm(inputs_embeds=model.get_input_embeddings()(tokens_R[:, None]), attention_mask=attn_BT,
                 position_ids=pos_B1, past_key_values=cache, use_cache=True)
        logits_BV = head(out.last_hidden_state[:, -1]).float() / scale

    T = max(int(mask_BT.sum(dim=1).max()), 1)
    ids_BT, logprobs_BT, mask_BT = ids_BT[:, :T], logprobs_BT[:, :T], mask_BT[:, :T]
    texts = tokenizer.batch_decode(ids_BT.masked_fill(mask_BT == 0, pad), skip_special_tokens=True)
    return Rollout(ids_BT, mask_BT, logprobs_BT, texts, torch.zeros(B, dtype=torch.bool, device=device),
                   audio_embeds_PAH)


def sequence_logprobs(model, batch, audio_embeds, completion_ids_BT, mask_BT, *, group_size: int,
                      temperature: float = 1.0, chunk_size: int = 1024,
                      rows_B: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) fp32 log-probs of the completions, teacher-forced over [prompt ; completion].

    batch: the P prompts (processor output); audio_embeds: (P, A, H) from the rollout, reused
    instead of re-encoding (None: encode now; re-encoded anyway when the encoder or projector train
    and gradients are on, so they get their gradient). completion_ids_BT / mask_BT: (B, T) rows of
    the P*G, or only the rows named by `rows_B` (micro-batches). Padded positions come back 0.
    Equals log_softmax(model(...).logits / temperature) at the completion tokens. The caller sets
    train/eval mode; the speech LoRA is switched on here.
    """
    speech_adapter(model, True)
    device = model.device
    if _has_audio(batch) and (audio_embeds is None or (torch.is_grad_enabled() and audio_trainable(model))):
        audio_embeds = encode_audio(model, batch)
    embeds_PTH = _prompt_embeds(model, batch, audio_embeds)
    attn_PT = batch["attention_mask"].to(device)
    P, Tp = attn_PT.shape
    prompt_B = expand_to_group(torch.arange(P, device=device), group_size)
    if rows_B is not None:
        prompt_B = prompt_B[rows_B.to(device)]
    ids_BT, mask_BT = completion_ids_BT.to(device), mask_BT.to(device)
    if ids_BT.shape[0] != prompt_B.shape[0]:
        raise ValueError(f"completion rows {ids_BT.shape[0]} != prompts x group_size ({P} x {group_size})"
                         + (f" selected by rows_B ({prompt_B.shape[0]})" if rows_B is not None else ""))
    x_BTH = torch.cat([embeds_PTH[prompt_B], model.get_input_embeddings()(ids_BT)], dim=1)
    attn_BT = torch.cat([attn_PT[prompt_B], mask_BT.to(attn_PT.dtype)], dim=1)
    hidden_BTH = decoder(model)(inputs_embeds=x_BTH, attention_mask=attn_BT, position_ids=_positions(attn_BT),
                                use_cache=False).last_hidden_state
    # The hidden state at position i predicts token i+1: the last prompt token predicts the first.
    T = ids_BT.shape[1]
    logprobs_BT = token_logprobs(hidden_BTH[:, Tp - 1: Tp - 1 + T], lm_head_weight(model), ids_BT,
                                 logit_scale=logit_scale(model), temperature=temperature, chunk_size=chunk_size)
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


def add_reference_samples(rollout: Rollout, references: list[str], tokenizer, *, group_size: int,
                          max_new_tokens: int) -> Rollout:
    """MP-GRPO: the last sample of each group becomes the tokenized reference (with EOS), marked
    off-policy; its sampling log-probs are 0 (unused: the loss takes pi_phi = 1 for it)."""
    G = group_size
    B = rollout.completion_ids_BT.shape[0]
    if B != len(references) * G:
        raise ValueError(f"add_reference_samples: {B} rows but {len(references)} references x G={G}")
    ref_ids_PT, ref_mask_PT = tokenize_targets(references, tokenizer, max_new_tokens)
    device = rollout.completion_ids_BT.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    T = max(rollout.completion_ids_BT.shape[1], ref_ids_PT.shape[1])

    def widen(x_BT, fill):
        return torch.nn.functional.pad(x_BT, (0, T - x_BT.shape[1]), value=fill)

    ids_BT = widen(rollout.completion_ids_BT, pad).clone()
    mask_BT = widen(rollout.mask_BT, 0).clone()
    logprobs_BT = widen(rollout.logprobs_BT, 0.0).clone()
    off_B = rollout.off_policy_B.clone()
    rows_P = torch.arange(len(references), device=device) * G + (G - 1)
    ids_BT[rows_P] = widen(ref_ids_PT, pad).to(device)
    mask_BT[rows_P] = widen(ref_mask_PT, 0).to(device)
    logprobs_BT[rows_P] = 0.0
    off_B[rows_P] = True
    texts = list(rollout.texts)
    ref_texts = tokenizer.batch_decode(ref_ids_PT, skip_special_tokens=True)
    for p, row in enumerate(rows_P.tolist()):
        texts[row] = ref_texts[p]
    return dataclasses.replace(rollout, completion_ids_BT=ids_BT, mask_BT=mask_BT, logprobs_BT=logprobs_BT,
                               texts=texts, off_policy_B=off_B)
