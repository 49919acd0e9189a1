"""The static decode engine of rollout.py's decode loop: a preallocated KV cache and Granite's
one-token step written out. An eager step is launch-bound (35 ms on the 2B shape against about
1 ms to read its weights), so on CUDA it is captured once per batch-size bucket (powers of two)
as a CUDA graph. The only code that depends on Granite's layer internals or on CUDA graphs.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from grpo_speech.model import decoder, has_speech_adapter, logit_scale


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
    bucket b replays it. The decode loop's R rows sit in the first R of the b = _bucket(R) slots;
    the slots beyond hold other rows' data and compute logits nobody reads. Rows leave by being
    moved into the first rows of a smaller bucket.
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
        self.graphs = graphs
        self.path = "static+cuda-graphs" if graphs else "static eager"
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.key = None
        self.b, self.next_slot = 0, 0  # the bucket in use, the slot the next step writes

    def load(self, cache, attn_PT: torch.Tensor, pos_P: torch.Tensor, G: int) -> None:
        """Start a rollout: slot r < B = P*G takes the prefill of its prompt r // G (the prompt's
        K/V in `cache`, its padding mask attn_PT, its last position pos_P); the slots from B to the
        bucket's end copy row B-1."""
        P, Tp = attn_PT.shape
        B = P * G
        self.b, self.next_slot = _bucket(B), Tp
        prompt_b = torch.arange(self.b, device=attn_PT.device).clamp_(max=B - 1) // G
        for l, layer in enumerate(cache.layers):  # the prompt's prefill, shared by its G rows
            self.k[l][:self.b, :, :Tp] = layer.keys[prompt_b]
            self.v[l][:self.b, :, :Tp] = layer.values[prompt_b]
        self.keep_RL[:self.b, :Tp] = attn_PT[prompt_b].bool()
        self.keep_RL[:self.b, Tp:] = True
        self.pos_R[:self.b] = pos_P[prompt_b]

    padded = staticmethod(_bucket)  # the slots the step computes for n rows

    def step(self, tokens_R: torch.Tensor) -> torch.Tensor:
        """(R, V) fp32 logits / logit_scale after feeding tokens_R to rows 0..R-1 (R <= b)."""
        R = tokens_R.shape[0]
        self.tok_R[:R] = tokens_R
        self.pos_R[:self.b] += 1
        self.slot.fill_(self.next_slot)
        self.next_slot += 1
        return self.run(self.b)[:R]

    def keep(self, rows_n: torch.Tensor) -> None:
        """Move rows rows_n (n of the current bucket's) to the front of every buffer; the step
        then runs at bucket _bucket(n)."""
        n = rows_n.shape[0]
        for cache in (*self.k, *self.v):
            cache[:n] = cache[rows_n]
        for buf in (self.tok_R, self.pos_R, self.keep_RL):
            buf[:n] = buf[rows_n]
        self.b = _bucket(n)

    def forward(self, b: int) -> torch.Tensor:
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
        """The step at bucket b: a CUDA graph replay (captured on first use), or eager."""
        if not self.graphs:
            return self.forward(b)
        if b not in self.captured:
            try:
                self.captured[b] = self._capture(b)
            except Exception as e:
                # Eager decoding is about 4x slower: a silent fallback would hide that.
                raise RuntimeError(f"CUDA graph capture of the decode step failed at batch size {b} "
                                   f"({type(e).__name__}: {str(e)[:200]}); to decode eagerly (about 4x "
                                   "slower), set model.cuda_graphs=false") from e
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
                self.forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast(**amp):
            logits_bV = self.forward(b)
        return graph, logits_bV


# One static decoder per model, kept between rollouts on CUDA so its graphs are captured once;
# reused only while every weight is at the same address (FSDP may re-gather elsewhere).
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model) -> tuple:
    lm = decoder(model)
    ptrs = tuple(t.data_ptr() for t in (*lm.parameters(), *lm.buffers(), *model.get_output_embeddings().parameters()))
    adapters = tuple(model.active_adapters()) if has_speech_adapter(model) else ()
    return ptrs, adapters, torch.is_autocast_enabled("cuda")


def static_decoder(model, cache, attn_PT: torch.Tensor, pos_P: torch.Tensor, *, G: int, new_tokens: int,
                   graphs: bool) -> StaticDecoder:
    """The static engine of `model` with the P prompts' prefill (`cache`, attn_PT, pos_P, as for
    `StaticDecoder.load`) loaded into G rows each, room for `new_tokens` more, and CUDA graphs when
    `graphs` (on CUDA only). On CUDA it is kept for the next rollout (`release_rollout_cache`)."""
    P, Tp = attn_PT.shape
    rows, slots = _bucket(P * G), Tp + new_tokens
    dtype, device = cache.layers[0].keys.dtype, attn_PT.device
    graphs = graphs and device.type == "cuda"
    key = _weights_key(model)
    dec = _DECODERS.get(model)
    if not (dec is not None and dec.key == key and dec.rows >= rows and dec.slots >= slots
            and dec.k[0].dtype == dtype and dec.k[0].device == device and dec.graphs == graphs):
        _DECODERS.pop(model, None)
        del dec  # free the old cache before allocating the new one
        dec = StaticDecoder(model, rows, (slots + 63) // 64 * 64, dtype, device, graphs)  # aligned slots
        dec.key = key
        if device.type == "cuda":
            _DECODERS[model] = dec
    dec.load(cache, attn_PT, pos_P, G)
    return dec


def release_rollout_cache(model) -> None:
    """Free the static KV cache and CUDA graphs kept for `model` between rollouts."""
    _DECODERS.pop(model, None)
