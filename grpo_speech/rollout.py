"""Group rollout for GRPO: G completions per spoken prompt, each clip encoded once.

Peers call `generate(num_return_sequences=G)`, which runs every clip G times through the
encoder and prefills the prompt G times. Here a clip goes through encoder + projector once, the
prompt is prefilled once, and its KV cache is shared by the G samples. The audio embeddings are
returned so the policy, old and reference log-prob passes reuse them.
Row p*G+g of every (B, ...) tensor belongs to prompt p (`expand_to_group`).

Two decode loops give the same tokens for a seed (tests/test_rollout.py):
- "static" (the default): a preallocated KV cache of B rows x (prompt + completion) slots and a
  hand-written Granite decode step over it; on CUDA the step is captured once per batch-size
  bucket (powers of two) as a CUDA graph, because the eager loop is launch-bound (issue 12: 35 ms
  a step against ~1 ms to read the 2B weights). Finished rows are masked, and every `check_every`
  steps, the only host sync, live rows are compacted into a smaller bucket.
- "dynamic": transformers' decoder forward with its growing cache, finished rows dropped each
  step. Kept as the reference and for decoders the static step does not cover.
Under torch.distributed both loops step in lock-step: until no row is alive on ANY rank (issue 11).

    python -m grpo_speech bench rollout --device cuda      # against generate(), on the 2B shape
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from grpo_speech.distributed import any_rank, is_distributed, root_call
from grpo_speech.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from grpo_speech.model import decoder, has_speech_adapter, logit_scale, lm_head_weight, speech_adapter
from grpo_speech.prefix import prompts_of_groups, shared_prefix_hidden


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
    """Which decode loop ran: "static+cuda-graphs", "static eager" or "dynamic"."""


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
    makes a row's tokens independent of when the others end, so both decode loops, which drop or
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


def _bucket(n: int) -> int:
    """Decode batch sizes are powers of two: a handful of CUDA graphs serve every row count."""
    return 1 << max(n - 1, 0).bit_length()


def _rotate(x, cos, sin):
    # RoPE as transformers' Granite applies it (rotate_half on the two halves of head_dim).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def static_supported(model) -> bool:
    """The static step is written for Granite decoder layers with plain RoPE."""
    lm = decoder(model)
    rope = getattr(getattr(lm, "rotary_emb", None), "rope_type", "")
    return (all(type(layer).__name__.endswith("GraniteDecoderLayer") for layer in lm.layers)
            and rope == "default")


class StaticDecoder:
    """A KV cache of `rows` x `slots` per layer, preallocated, and Granite's one-token decode step
    over it, written out: embed (x embedding_multiplier), per layer RMSNorm, q/k/v projections
    (called as modules, so a peft LoRA on q_proj/v_proj stays in), RoPE, the new K/V written at
    slot `slot`, attention over the cache with grouped queries (no K/V repeat), o_proj and MLP
    scaled by residual_multiplier, final norm, lm_head / logit_scale. tests/test_rollout.py checks
    it against the model's forward.

    The step reads only the buffers below and the first b rows of the cache, so one CUDA graph per
    bucket b replays it; rows leave by being compacted into the first b' < b rows.
    """

    def __init__(self, model, rows: int, slots: int, dtype: torch.dtype, device: torch.device, graphs: bool):
        lm = decoder(model)
        tc = model.config.text_config
        self.lm, self.head, self.scale = lm, model.get_output_embeddings(), logit_scale(model)
        self.layers = list(lm.layers)
        self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.rows, self.slots = rows, slots
        shape = (rows, self.kv_heads, slots, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.tok_R = torch.zeros(rows, dtype=torch.long, device=device)    # token fed at this step
        self.pos_R = torch.zeros(rows, dtype=torch.long, device=device)    # its RoPE position
        self.keep_RL = torch.zeros(rows, slots, dtype=torch.bool, device=device)  # prompt padding off
        self.slot = torch.zeros(1, dtype=torch.long, device=device)        # where its K/V go
        self.slots_L = torch.arange(slots, device=device)
        self.graphs = graphs and device.type == "cuda"
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.key = None

    def step(self, b: int) -> torch.Tensor:
        """(b, V) fp32 logits / logit_scale for the tokens in tok_R[:b]; writes their K/V."""
        lm = self.lm
        x = lm.embed_tokens(self.tok_R[:b, None]) * lm.embedding_multiplier  # (b, 1, H)
        cos, sin = lm.rotary_emb(x, position_ids=self.pos_R[:b, None])
        cos, sin = cos[:, None], sin[:, None]  # (b, 1, 1, d): broadcast over heads
        # A slot is visible when it holds a real prompt token or a token generated up to now.
        mask_b11L = (self.keep_RL[:b] & (self.slots_L <= self.slot))[:, None, None, :]
        n_rep = self.heads // self.kv_heads
        for layer, k_cache, v_cache in zip(self.layers, self.k, self.v):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k_cache[:b].index_copy_(2, self.slot, k)
            v_cache[:b].index_copy_(2, self.slot, v)
            # Query head kv*n_rep + r reads K/V head kv (transformers' repeat_kv): the n_rep query
            # heads of a group attend as n_rep "positions" of one head, so the cache is read once.
            q = q.reshape(b, self.kv_heads, n_rep, self.head_dim)
            o = F.scaled_dot_product_attention(q, k_cache[:b], v_cache[:b], attn_mask=mask_b11L,
                                               scale=attn.scaling)
            x = x + attn.o_proj(o.reshape(b, 1, self.heads * self.head_dim)) * layer.residual_multiplier
            x = x + layer.mlp(layer.post_attention_layernorm(x)) * layer.residual_multiplier
        return self.head(lm.norm(x)[:, 0]).float() / self.scale

    def run(self, b: int) -> torch.Tensor:
        """The step at bucket b: a CUDA graph replay on CUDA (captured on first use), else eager."""
        if not self.graphs:
            return self.step(b)
        if b not in self.captured:
            try:
                self.captured[b] = self._capture(b)
            except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
                print(f"note: CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                      "decoding eagerly", flush=True)
                self.graphs, self.captured = False, {}
                return self.step(b)
        graph, logits_bV = self.captured[b]
        graph.replay()
        return logits_bV

    def _capture(self, b: int):
        # Warm-up on a side stream (lazy initialisation, library handles) before capture, as the
        # CUDA graphs notes ask. The warm-up steps write the same K/V at the same slot as the
        # replay that follows, so they change nothing.
        autocast = torch.is_autocast_enabled("cuda")
        amp = dict(device_type="cuda", enabled=autocast, cache_enabled=False,
                   dtype=torch.get_autocast_dtype("cuda") if autocast else torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast(**amp):
            for _ in range(2):
                self.step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast(**amp):
            logits_bV = self.step(b)
        return graph, logits_bV

    def compact(self, keep_n: torch.Tensor) -> None:
        """Move rows keep_n (slots of the current bucket) to the front of every buffer."""
        n = keep_n.shape[0]
        for cache in (*self.k, *self.v):
            cache[:n] = cache[keep_n]
        for buf in (self.tok_R, self.pos_R, self.keep_RL):
            buf[:n] = buf[keep_n]


# One static decoder per model, kept between rollouts on CUDA so its graphs are captured once;
# reused only while every weight is at the same address (FSDP may re-gather elsewhere).
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model) -> tuple:
    lm = decoder(model)
    ptrs = tuple(t.data_ptr() for t in (*lm.parameters(), *lm.buffers(), *model.get_output_embeddings().parameters()))
    adapters = tuple(model.active_adapters()) if has_speech_adapter(model) else ()
    return ptrs, adapters, torch.is_autocast_enabled("cuda")


def _static_decoder(model, rows: int, slots: int, dtype, device, graphs: bool) -> StaticDecoder:
    key = _weights_key(model)
    dec = _DECODERS.get(model)
    if (dec is not None and dec.key == key and dec.rows >= rows and dec.slots >= slots
            and dec.k[0].dtype == dtype and dec.k[0].device == device):
        return dec
    _DECODERS.pop(model, None)
    del dec  # free the old cache before allocating the new one
    dec = StaticDecoder(model, rows, -(-slots // 64) * 64, dtype, device, graphs)  # aligned slots
    dec.key = key
    if device.type == "cuda":
        _DECODERS[model] = dec
    return dec


def release_rollout_cache(model) -> None:
    """Free the static KV cache and CUDA graphs kept for `model` between rollouts."""
    _DECODERS.pop(model, None)


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


def _expand_cache(cache, G: int) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cannot expand a {type(layer).__name__} cache layer to the group")
        layer.keys, layer.values = expand_to_group(layer.keys, G), expand_to_group(layer.values, G)


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

    sampler: "static" (preallocated KV cache, CUDA graphs on CUDA unless cuda_graphs=False),
    "dynamic" (transformers' cache, finished rows dropped each step) or "auto" (static where the
    decoder is supported, else dynamic). check_every: steps between the "all done?" checks, the
    loop's only host syncs (and, under torch.distributed, its only all-reduces).
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
    with _weights_gathered(model, gather_weights):
        audio_embeds_PAH = encode_audio(model, batch)
        embeds_PTH = _prompt_embeds(model, batch, audio_embeds_PAH)
        attn_PT = batch["attention_mask"].to(model.device)
        # 1. Prefill once per prompt (P rows, not P*G).
        out = decoder(model)(inputs_embeds=embeds_PTH, attention_mask=attn_PT, position_ids=_positions(attn_PT),
                             use_cache=True)
        args = dict(G=group_size, N=max_new_tokens, temperature=temperature, top_p=top_p,
                    eos=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
                    generator=generator, min_new_tokens=min_new_tokens, check_every=check_every,
                    noise_rows=None if noise_rows is None else (noise_rows[0].to(attn_PT.device), noise_rows[1]))
        # 2. Decode.
        if sampler == "static":
            ids_BT, mask_BT, logprobs_BT, path = _decode_static(model, out, attn_PT, cuda_graphs=cuda_graphs, **args)
        else:
            ids_BT, mask_BT, logprobs_BT, path = _decode_dynamic(model, out, attn_PT, **args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else args["eos"]
    T = max(int(mask_BT.sum(dim=1).max()), 1)
    ids_BT = ids_BT[:, :T].masked_fill(mask_BT[:, :T] == 0, pad)
    mask_BT, logprobs_BT = mask_BT[:, :T], logprobs_BT[:, :T]
    texts = tokenizer.batch_decode(ids_BT, skip_special_tokens=True)
    B = ids_BT.shape[0]
    return Rollout(ids_BT, mask_BT, logprobs_BT, texts, torch.zeros(B, dtype=torch.bool, device=ids_BT.device),
                   audio_embeds_PAH, path)


def _banned(model, eos: int, device):
    audio = model.config.audio_token_id
    return torch.tensor([audio], device=device), torch.tensor([audio, eos], device=device)


def _decode_static(model, out, attn_PT, *, G, N, temperature, top_p, eos, generator, min_new_tokens,
                   check_every, cuda_graphs, noise_rows=None):
    device = attn_PT.device
    P, Tp = attn_PT.shape
    B = P * G
    cache = out.past_key_values
    logits_PV = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float() / logit_scale(model)
    V = logits_PV.shape[-1]
    dec = _static_decoder(model, _bucket(B), Tp + N, cache.layers[0].keys.dtype, device, cuda_graphs)
    banned_audio, banned_eos = _banned(model, eos, device)

    # Bucket slots 0..B-1 hold rows 0..B-1; the slots beyond B (B not a power of two) are dummies
    # that copy row B-1 and write their results into a sink row B, dropped at the end.
    b = _bucket(B)
    row_b = torch.arange(b, device=device).clamp_(max=B)
    alive_b = row_b < B
    prompt_b = row_b.clamp(max=B - 1) // G
    for l, layer in enumerate(cache.layers):  # the prompt's prefill, shared by its G rows
        dec.k[l][:b, :, :Tp] = layer.keys[prompt_b]
        dec.v[l][:b, :, :Tp] = layer.values[prompt_b]
    dec.keep_RL[:b, :Tp] = attn_PT[prompt_b].bool()
    dec.keep_RL[:b, Tp:] = True
    dec.pos_R[:b] = _positions(attn_PT)[prompt_b, -1]
    logits_bV = logits_PV[prompt_b]
    del out, cache

    ids_BT = torch.zeros(B + 1, N, dtype=torch.long, device=device)
    logprobs_BT = torch.zeros(B + 1, N, dtype=torch.float32, device=device)
    mask_BT = torch.zeros(B + 1, N, dtype=torch.long, device=device)
    for t in range(N):
        noise_bV = (_race_noise(B, V, generator, device, noise_rows)[row_b.clamp(max=B - 1)]
                    if temperature > 0 else None)
        tokens_b, lp_b = _sample(logits_bV, noise_bV, temperature=temperature, top_p=top_p,
                                 banned=banned_eos if t < min_new_tokens else banned_audio)
        ids_BT[:, t].index_copy_(0, row_b, tokens_b * alive_b)
        logprobs_BT[:, t].index_copy_(0, row_b, lp_b * alive_b)
        mask_BT[:, t].index_copy_(0, row_b, alive_b.long())
        alive_b = alive_b & (tokens_b != eos)  # the row keeps stepping, masked, until the next check
        if t == N - 1:
            break
        if (t + 1) % check_every == 0:
            # "All done?": the loop's only host sync, and under torch.distributed its only
            # all-reduce, asked at the same steps on every rank; the loop ends when no rank has a
            # live row. Live rows then move to the front of a smaller bucket; an idle rank keeps
            # one dummy row stepping so that its loop runs as long as the others'.
            live_n = alive_b.nonzero()[:, 0]
            n = live_n.shape[0]
            if not any_rank(n > 0):
                break
            if _bucket(max(n, 1)) < b:
                b = _bucket(max(n, 1))
                keep_b = torch.cat([live_n, live_n.new_zeros(b - n)]) if n else live_n.new_zeros(b)
                dec.compact(keep_b)
                tokens_b, row_b = tokens_b[keep_b], row_b[keep_b]
                alive_b = torch.arange(b, device=device) < n
                row_b = torch.where(alive_b, row_b, B)
        dec.tok_R[:b] = tokens_b
        dec.pos_R[:b] += 1
        dec.slot.fill_(Tp + t)
        logits_bV = dec.run(b)
    path = "static+cuda-graphs" if dec.graphs else "static eager"
    return ids_BT[:B], mask_BT[:B], logprobs_BT[:B], path


def _decode_dynamic(model, out, attn_PT, *, G, N, temperature, top_p, eos, generator, min_new_tokens,
                    check_every, noise_rows=None):
    device = attn_PT.device
    lm, head, scale = decoder(model), model.get_output_embeddings(), logit_scale(model)
    P = attn_PT.shape[0]
    B = P * G
    cache = out.past_key_values
    _expand_cache(cache, G)
    logits_RV = expand_to_group(head(out.last_hidden_state[:, -1]).float() / scale, G)
    V = logits_RV.shape[-1]
    attn_RT = expand_to_group(attn_PT, G)
    pos_R1 = expand_to_group(_positions(attn_PT)[:, -1:], G)
    banned_audio, banned_eos = _banned(model, eos, device)
    lockstep = is_distributed()

    ids_BT = torch.zeros(B, N, dtype=torch.long, device=device)
    logprobs_BT = torch.zeros(B, N, dtype=torch.float32, device=device)
    mask_BT = torch.zeros(B, N, dtype=torch.long, device=device)
    rows_R = torch.arange(B, device=device)  # rows of the B still decoding
    alive_R = torch.ones(B, dtype=torch.bool, device=device)  # False only for an idle rank's dummy
    for t in range(N):
        noise_RV = _race_noise(B, V, generator, device, noise_rows)[rows_R] if temperature > 0 else None
        tokens_R, lp_R = _sample(logits_RV, noise_RV, temperature=temperature, top_p=top_p,
                                 banned=banned_eos if t < min_new_tokens else banned_audio)
        live = rows_R[alive_R]
        ids_BT[live, t], logprobs_BT[live, t], mask_BT[live, t] = tokens_R[alive_R], lp_R[alive_R], 1
        alive_R = alive_R & (tokens_R != eos)
        n = int(alive_R.sum())  # this loop syncs every step anyway: drop finished rows now
        if t == N - 1 or (n == 0 and not lockstep):
            break
        if lockstep and (t + 1) % check_every == 0 and not any_rank(n > 0):
            break  # every rank asks at the same steps: all leave together
        if n < alive_R.shape[0]:
            # Keep the live rows; with none left (other ranks still decoding) keep one as a dummy.
            keep_R = alive_R.nonzero()[:, 0] if n else torch.zeros(1, dtype=torch.long, device=device)
            rows_R, tokens_R, alive_R = rows_R[keep_R], tokens_R[keep_R], alive_R[keep_R]
            attn_RT, pos_R1 = attn_RT[keep_R], pos_R1[keep_R]
            cache.batch_select_indices(keep_R)
        attn_RT = torch.cat([attn_RT, attn_RT.new_ones(attn_RT.shape[0], 1)], dim=1)
        pos_R1 = pos_R1 + 1
        out = lm(inputs_embeds=model.get_input_embeddings()(tokens_R[:, None]), attention_mask=attn_RT,
                 position_ids=pos_R1, past_key_values=cache, use_cache=True)
        logits_RV = head(out.last_hidden_state[:, -1]).float() / scale
    return ids_BT, mask_BT, logprobs_BT, "dynamic"


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
    prompt_B = expand_to_group(torch.arange(P, device=device), group_size)
    if rows_B is not None:
        prompt_B = prompt_B[rows_B.to(device)]
    ids_BT, mask_BT = completion_ids_BT.to(device), mask_BT.to(device)
    T = ids_BT.shape[1]
    if shared_prefix and group_size > 1:
        prompts = prompts_of_groups(None if rows_B is None else rows_B.to(device), P, group_size)
        if ids_BT.shape[0] != prompts.shape[0] * group_size:
            raise ValueError(f"completion rows {ids_BT.shape[0]} != {prompts.shape[0]} groups x {group_size}")
        hidden_BTH = shared_prefix_hidden(decoder(model), embeds_PTH[prompts], attn_PT[prompts],
                                          model.get_input_embeddings()(ids_BT), mask_BT, group_size)
        logprobs_BT = token_logprobs(hidden_BTH, lm_head_weight(model), ids_BT, logit_scale=logit_scale(model),
                                     temperature=temperature, chunk_size=chunk_size)
        return logprobs_BT * mask_BT
    if ids_BT.shape[0] != prompt_B.shape[0]:
        raise ValueError(f"completion rows {ids_BT.shape[0]} != prompts x group_size ({P} x {group_size})"
                         + (f" selected by rows_B ({prompt_B.shape[0]})" if rows_B is not None else ""))
    x_BTH = torch.cat([embeds_PTH[prompt_B], model.get_input_embeddings()(ids_BT)], dim=1)
    attn_BT = torch.cat([attn_PT[prompt_B], mask_BT.to(attn_PT.dtype)], dim=1)
    hidden_BTH = decoder(model)(inputs_embeds=x_BTH, attention_mask=attn_BT, position_ids=_positions(attn_BT),
                                use_cache=False).last_hidden_state
    # The hidden state at position i predicts token i+1: the last prompt token predicts the first.
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
