"""Shared-prefix teacher forcing: each prompt runs through the decoder once per group.

A group's G completions share one prompt (the clip's audio embeddings and the instruction), and
speech prompts are long next to their answers (the embedded default: about 50 prompt positions
for 15-20 completion tokens; Granite on LibriSQA: about 210 for 20-50). The per-row pass scores
G copies of [prompt ; completion_g], so the prompt's layers run G times. Here one packed row per
group holds

    [prompt ; completion_1 ; ... ; completion_G]      length Lp + G*T

and a block mask gives each position exactly the context it has in its own per-row sequence:
prompt tokens attend causally within the prompt; completion g's tokens attend to the prompt's
real tokens and causally to completion g alone. Completion g sits at the positions (RoPE) it
would have after its prompt, so every completion token sees the same keys, values and positions
as in the per-row pass, and its log-prob is the same number up to float rounding. Gradients from
all G completions meet in the one copy of the prompt, as the sum of the per-row gradients.

The decoder runs unchanged (transformers takes a 4-D mask as given), so FSDP2's per-layer
gathering, activation checkpointing and a LoRA on the attention projections work as in the
per-row pass. Tokens through the decoder: Lp + G*T per group instead of G*(Lp + T); attention
scores: (Lp + G*T)^2 instead of G*(Lp + T)^2, which is larger when completions are much longer
than prompts (`python -m grpo_speech bench prefix` measures both cases side by side).

Idea published for text as "Prefix Grouper" (Liu et al., arXiv 2506.05433).
"""
from __future__ import annotations

import torch

# Attention kernels that take an arbitrary boolean or additive 4-D mask.
MASKED_ATTENTION = ("sdpa", "eager")


def prompts_of_groups(rows_B: torch.Tensor | None, n_prompts: int, group_size: int) -> torch.Tensor:
    """The prompt index of each group in `rows_B`, which must hold whole groups in order
    (p*G .. p*G+G-1 for each of its prompts p); None: every prompt's group. The training loop's
    micro-batches hold whole groups (train.micro_batches), so a group is never cut in two."""
    device = rows_B.device if rows_B is not None else None
    if rows_B is None:
        return torch.arange(n_prompts, device=device)
    G = group_size
    if rows_B.numel() % G:
        raise ValueError(f"shared-prefix pass: {rows_B.numel()} rows is not a whole number of groups of {G}")
    prompts = rows_B[::G] // G
    whole = (prompts[:, None] * G + torch.arange(G, device=rows_B.device)).flatten()
    if not torch.equal(whole, rows_B):
        raise ValueError("shared-prefix pass: rows_B must hold whole groups, each in order p*G .. p*G+G-1")
    return prompts


def packed_layout(attn_PT: torch.Tensor, mask_BT: torch.Tensor, group_size: int):
    """Positions, attention mask and read-out index of the packed rows [prompt ; c_1 .. c_G].

    attn_PT: (P, Tp) the prompts' attention mask (left padded); mask_BT: (B, T) the completions'
    token mask, B = P*G, row p*G+g completion g of prompt p. Returns
      position_PL: (P, L) RoPE positions, L = Tp + G*T: the prompt's as in the per-row pass
                   (first real token 0), completion g's token t at n_p + t (n_p real prompt tokens);
      allowed_P1LL: (P, 1, L, L) bool, True where query i may attend key j (every position also
                   attends itself, so that no softmax row is empty: padding gives finite outputs
                   that nothing reads);
      read_BT:     (B, T) index into the L positions of the hidden state that predicts each
                   completion token: the prompt's last position for t = 0, else completion g's t-1.
    """
    G = group_size
    P, Tp = attn_PT.shape
    T = mask_BT.shape[1]
    device = attn_PT.device
    L = Tp + G * T
    n_P = attn_PT.long().sum(dim=1)
    prompt_pos = (attn_PT.long().cumsum(-1) - 1).clamp_(min=0) * attn_PT.long()
    t = torch.arange(T, device=device)
    completion_pos = (n_P[:, None, None] + t).expand(P, G, T).reshape(P, G * T)
    position_PL = torch.cat([prompt_pos, completion_pos], dim=1)

    key_ok_PL = torch.cat([attn_PT.bool(), mask_BT.bool().view(P, G * T)], dim=1)
    segment_L = torch.cat([torch.full((Tp,), -1, device=device),
                           torch.arange(G, device=device).repeat_interleave(T)])
    i = torch.arange(L, device=device)
    causal_LL = i[None, :] <= i[:, None]
    same_LL = (segment_L[None, :] == -1) | (segment_L[None, :] == segment_L[:, None])
    allowed_PLL = (causal_LL & same_LL)[None] & key_ok_PL[:, None, :]
    allowed_PLL |= torch.eye(L, dtype=torch.bool, device=device)

    g_BT = torch.arange(G, device=device).repeat(P)[:, None]
    read_BT = torch.where(t[None] == 0, Tp - 1, Tp + g_BT * T + t[None] - 1)
    return position_PL, allowed_PLL[:, None], read_BT


def shared_prefix_hidden(lm, embeds_PTH: torch.Tensor, attn_PT: torch.Tensor, completion_embeds_BTH: torch.Tensor,
                         mask_BT: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, T, H) decoder hidden states that predict each completion token, from one packed row
    per group; equal to the per-row pass's hidden[:, Tp-1 : Tp-1+T] up to rounding.

    lm: the decoder (GraniteModel: embeddings in, last_hidden_state out); embeds_PTH: (P, Tp, H)
    prompt input embeddings (audio merged in); completion_embeds_BTH: (B, T, H), B = P*G."""
    impl = getattr(lm.config, "_attn_implementation", "sdpa")
    if impl not in MASKED_ATTENTION:
        raise ValueError(f"the shared-prefix log-prob pass needs an attention kernel that takes a 4-D mask "
                         f"({', '.join(MASKED_ATTENTION)}), the model uses {impl!r}: set "
                         "model.shared_prefix=false or load the model with attn_implementation='sdpa'")
    P, Tp, H = embeds_PTH.shape
    B, T, _ = completion_embeds_BTH.shape
    G = group_size
    position_PL, allowed_P1LL, read_BT = packed_layout(attn_PT, mask_BT, G)
    x_PLH = torch.cat([embeds_PTH, completion_embeds_BTH.reshape(P, G * T, H)], dim=1)
    mask = allowed_P1LL
    if impl == "eager":  # eager attention adds the mask to the scores
        mask = torch.zeros(allowed_P1LL.shape, dtype=x_PLH.dtype, device=x_PLH.device).masked_fill_(
            ~allowed_P1LL, torch.finfo(x_PLH.dtype).min)
    hidden_PLH = lm(inputs_embeds=x_PLH, attention_mask=mask, position_ids=position_PL,
                    use_cache=False).last_hidden_state
    prompt_B = torch.arange(P, device=read_BT.device).repeat_interleave(G)
    return hidden_PLH[prompt_B[:, None], read_BT]
