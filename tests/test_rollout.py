"""Group rollout: greedy equals generate(), sampling follows temperature/top-p, one encoder pass;
the decode loop gives the same tokens over the static and the dynamic engine, and the model's
log-probs.

Run: .venv/bin/python -m pytest -q tests/test_rollout.py
"""
import copy

import pytest
import torch

from grpo_speech.model import build_tiny_model, build_tokenizer, set_trainable
from grpo_speech import rollout as rollout_module
from grpo_speech.rollout import (
    DynamicDecoder, add_reference_samples, expand_to_group, sample_groups, sequence_logprobs, tokenize_targets,
)
from grpo_speech.static_decode import StaticDecoder, release_rollout_cache

SAMPLERS = ["static", "dynamic"]

TEXTS = ["the cat sits on the mat", "die Katze sitzt auf der Matte", "hello world",
         "a man reads a book", "ein Mann liest ein Buch"] * 10
# Small widths keep the file fast; multipliers 1.0 and wide random LM weights give a model whose
# greedy output changes from token to token (Granite's 0.22 residual with tied embeddings makes a
# random model repeat its last input token forever).
SIZES = dict(enc_hidden=64, enc_layers=2, enc_heads=2, proj_hidden=64, proj_heads=2, proj_intermediate=128,
             lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128,
             residual_multiplier=1.0, embedding_multiplier=1.0)


def random_speech_model():
    """(model, processor, tokenizer): the tiny Granite Speech of SIZES with wide random LM weights."""
    tok = build_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(0)
    model, proc = build_tiny_model(tok, **SIZES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "language_model" in name:
                p.normal_(0, 0.15)
    return model, proc, tok


@pytest.fixture(scope="module")
def tiny():
    model, proc, tok = random_speech_model()
    set_trainable(model, "llm")  # encoder and projector frozen: audio embeddings are reusable
    model.eval()
    g = torch.Generator().manual_seed(0)
    audio = [torch.randn(16000, generator=g) * 0.1, torch.randn(24000, generator=g) * 0.1]
    # Different text lengths and clip lengths: the shorter prompt is left padded.
    batch = proc(["<|audio|> hi", "say <|audio|> something long the cat"], audio, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any() and (batch["attention_mask"][1] == 1).all()
    return model, proc, tok, batch


_EOS = {}


def _eos_ending_one_row(model, batch, tok):
    """An id to use as EOS that greedy decoding emits in row 1 but never in row 0 (random weights
    rarely pick the real EOS), so the two rows end at different steps. Found once per model."""
    if id(model) not in _EOS:
        r = sample_groups(model, batch, group_size=1, max_new_tokens=20, temperature=0, tokenizer=tok)
        row0, row1 = r.completion_ids_BT.tolist()
        _EOS[id(model)] = next(t for t in row1[2:] if t not in row0)
    return _EOS[id(model)]


def _forward_logprobs(model, batch, ids_BT, mask_BT, G, temperature=1.0):
    """Reference: the model's own forward on [prompt ; completion], log_softmax(logits / T)."""
    P, Tp = batch["input_ids"].shape
    full = torch.cat([expand_to_group(batch["input_ids"], G), ids_BT], 1)
    attn = torch.cat([expand_to_group(batch["attention_mask"], G), mask_BT], 1)
    logits = model(input_ids=full, attention_mask=attn,
                   input_features=expand_to_group(batch["input_features"], G),
                   input_features_mask=expand_to_group(batch["input_features_mask"], G)).logits
    lp = (logits[:, Tp - 1:-1].float() / temperature).log_softmax(-1)
    return lp.gather(2, ids_BT[..., None])[..., 0] * mask_BT


def test_expand_to_group_row_belongs_to_prompt():
    x_P2 = torch.tensor([[10, 11], [20, 21], [30, 31]])
    # Row p*G+g must be prompt p: for G=2 rows are p0,p0,p1,p1,p2,p2 (.repeat would give p0,p1,p2,p0,..).
    assert expand_to_group(x_P2, 2).tolist() == [[10, 11], [10, 11], [20, 21], [20, 21], [30, 31], [30, 31]]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_greedy_equals_generate_and_groups_follow_prompts(tiny, sampler):
    model, _, tok, batch = tiny
    eos = _eos_ending_one_row(model, batch, tok)
    audio_id = model.config.audio_token_id
    r = sample_groups(model, batch, group_size=1, max_new_tokens=20, temperature=0, tokenizer=tok, eos_token_id=eos,
                      sampler=sampler)
    gen = model.generate(**batch, do_sample=False, max_new_tokens=20, suppress_tokens=[audio_id],
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    gen_BT = gen[:, batch["input_ids"].shape[1]:]
    lengths = r.mask_BT.sum(1).tolist()
    assert lengths[0] == 20 and lengths[1] < 20 and r.completion_ids_BT[1, lengths[1] - 1] == eos
    assert gen_BT.shape == r.completion_ids_BT.shape
    assert torch.equal(gen_BT, r.completion_ids_BT)
    # G=3 greedy: every row p*G+g repeats prompt p's greedy completion.
    r3 = sample_groups(model, batch, group_size=3, max_new_tokens=20, temperature=0, tokenizer=tok, eos_token_id=eos,
                       sampler=sampler)
    for row in range(6):
        assert torch.equal(r3.completion_ids_BT[row], r.completion_ids_BT[row // 3]), row
    assert r3.texts[4] == r.texts[1]


def test_finished_rows_leave_the_decode_batch(tiny):
    model, _, tok, batch = tiny
    eos = _eos_ending_one_row(model, batch, tok)
    rows_seen = []
    hook = model.model.language_model.register_forward_hook(
        lambda m, args, kw, out: rows_seen.append(kw["inputs_embeds"].shape[:2]), with_kwargs=True)
    try:
        r = sample_groups(model, batch, group_size=2, max_new_tokens=20, temperature=0, tokenizer=tok,
                          eos_token_id=eos, sampler="dynamic")
    finally:
        hook.remove()
    lengths = r.mask_BT.sum(1)
    assert lengths.tolist()[0] == 20 and lengths.tolist()[2] < 20  # rows of prompt 1 end early
    eos_at = (r.completion_ids_BT == eos) & (r.mask_BT == 1)
    # A row of length L ending in EOS takes part in decode steps 1..L-1: L-1 one-token calls.
    assert rows_seen[0] == (2, batch["input_ids"].shape[1])  # prefill: P prompts, not P*G
    assert sum(n for n, t in rows_seen[1:]) == int((lengths - 1).sum())
    assert (eos_at.sum(1) <= 1).all()
    for b in range(4):
        L = int(lengths[b])
        assert r.mask_BT[b, :L].all() and not r.mask_BT[b, L:].any()
        assert (r.completion_ids_BT[b, L:] == tok.pad_token_id).all()


def test_static_rows_leave_by_moving_to_a_smaller_bucket(tiny, monkeypatch):
    model, _, tok, batch = tiny
    eos = _eos_ending_one_row(model, batch, tok)
    buckets, checks = [], []
    forward, any_rank = StaticDecoder.forward, rollout_module.any_rank
    monkeypatch.setattr(StaticDecoder, "forward", lambda self, b: buckets.append(b) or forward(self, b))
    monkeypatch.setattr(rollout_module, "any_rank", lambda flag: checks.append(flag) or any_rank(flag))
    r = sample_groups(model, batch, group_size=2, max_new_tokens=20, temperature=0, tokenizer=tok,
                      eos_token_id=eos, sampler="static", check_every=4)
    L = r.mask_BT.sum(1).tolist()
    assert L[:2] == [20, 20] and L[2] == L[3] < 20  # prompt 1's rows end after L[2] tokens
    # Sampling at steps t = 0..19, a decode step after each but the last (19 steps); "all done?"
    # only after t = 3, 7, 11, 15 (every 4 steps, always answered yes: rows 0, 1 live on). Rows 2
    # and 3 emit EOS at step L-1, stay masked in bucket 4 until the next check c >= L-1, and from
    # the decode step of step c on, rows 0 and 1 decode alone in bucket 2.
    assert checks == [True] * 4
    c = next((t for t in (3, 7, 11, 15) if t >= L[2] - 1), 19)
    assert buckets == [4] * c + [2] * (19 - c)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_idle_rank_steps_one_finished_row_until_no_rank_decodes(tiny, monkeypatch, sampler):
    model, _, tok, batch = tiny
    eos = _eos_ending_one_row(model, batch, tok)
    one = {k: v[1:] for k, v in batch.items()}  # prompt 1, whose greedy rows end early
    kw = dict(group_size=2, max_new_tokens=20, temperature=0, tokenizer=tok, eos_token_id=eos, sampler=sampler,
              check_every=4)
    alone = sample_groups(model, one, **kw)
    L = int(alone.mask_BT.sum(1).max())
    assert L < 20
    rows = []  # rows the loop hands to the engine at each decode step
    engine = StaticDecoder if sampler == "static" else DynamicDecoder
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda self, tokens_R: rows.append(len(tokens_R)) or step(self, tokens_R))
    monkeypatch.setattr(rollout_module, "any_rank", lambda flag: True)  # as if another rank decoded on
    busy = sample_groups(model, one, **kw)
    # The same output; but instead of leaving once its rows end (the dynamic engine after step
    # L-1, the static one at the next check), this rank runs all 19 decode steps (one after each
    # of the 20 samplings but the last), as long as the busy rank, with one finished row left.
    assert torch.equal(busy.completion_ids_BT, alone.completion_ids_BT) and torch.equal(busy.mask_BT, alone.mask_BT)
    assert torch.equal(busy.logprobs_BT, alone.logprobs_BT)
    assert len(rows) == 19 and rows[0] == 2 and rows[-1] == 1


def test_a_failed_graph_capture_is_an_error(tiny, monkeypatch):
    # Capturing needs a GPU: on a CPU a capture that raises stands in for one that fails. Decoding
    # eagerly instead, about 4x slower, must be asked for (cuda_graphs=False), not fallen into.
    model, _, tok, _ = tiny

    def fail(self, b):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecoder, "_capture", fail)
    graphed = StaticDecoder(model, 2, 8, torch.float32, torch.device("cpu"), graphs=True)
    with pytest.raises(RuntimeError, match="set model.cuda_graphs=false"):
        graphed.run(2)
    eager = StaticDecoder(model, 2, 8, torch.float32, torch.device("cpu"), graphs=False)
    assert eager.run(2).shape == (2, len(tok)) and eager.path == "static eager"


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_static_and_dynamic_engines_sample_the_same_tokens(tiny, monkeypatch, top_p):
    model, _, tok, batch = tiny
    kw = dict(group_size=3, max_new_tokens=20, temperature=0.8, top_p=top_p, tokenizer=tok, check_every=3)
    # An EOS that row 0 samples (after its 2nd token) and row 5 never does: a row's noise is its
    # own, so with that EOS row 0 ends there and row 5 runs to the end.
    free = sample_groups(model, batch, eos_token_id=-1, generator=torch.Generator().manual_seed(7), **kw)
    row0, row5 = free.completion_ids_BT[0].tolist(), free.completion_ids_BT[5].tolist()
    eos = next(t for t in row0[2:] if t not in row5)
    runs = {}
    for sampler in SAMPLERS:
        if top_p == 1.0 and sampler == "static":  # training's top_p: no vocabulary-wide sort
            monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: pytest.fail("sorted at top_p 1"))
        runs[sampler] = sample_groups(model, batch, eos_token_id=eos, generator=torch.Generator().manual_seed(7),
                                      sampler=sampler, **kw)
    s, d = runs["static"], runs["dynamic"]
    lengths = d.mask_BT.sum(1)
    # B = 6 rows in a bucket of 8 (2 dummy slots); rows end at different steps, so the dynamic
    # engine drops rows at once while the static one keeps them masked until a check.
    assert 2 < lengths[0] < lengths[5] == 20
    assert s.decode_path == "static eager" and d.decode_path == "dynamic"
    assert torch.equal(s.completion_ids_BT, d.completion_ids_BT) and torch.equal(s.mask_BT, d.mask_BT)
    torch.testing.assert_close(s.logprobs_BT, d.logprobs_BT, atol=2e-5, rtol=0)


def test_static_step_keeps_the_speech_lora(tiny):
    # The speech LoRA sits on q_proj/v_proj; the static step calls those modules, so it is in.
    from peft import LoraConfig

    model, _, tok, batch = tiny
    lora = copy.deepcopy(model)
    lora.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.eval()
    runs = {s: sample_groups(lora, batch, group_size=2, max_new_tokens=8, temperature=1.0, tokenizer=tok,
                             generator=torch.Generator().manual_seed(2), sampler=s) for s in SAMPLERS}
    assert torch.equal(runs["static"].completion_ids_BT, runs["dynamic"].completion_ids_BT)
    r = runs["static"]
    with torch.no_grad():
        want = _forward_logprobs(lora, batch, r.completion_ids_BT, r.mask_BT, 2)
        base = _forward_logprobs(model, batch, r.completion_ids_BT, r.mask_BT, 2)
    torch.testing.assert_close(r.logprobs_BT, want, atol=2e-5, rtol=0)
    assert (base - want).abs().max() > 1e-2  # the adapter does change the log-probs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_replay_the_eager_step(tiny):
    model, _, tok, batch = tiny
    eos = _eos_ending_one_row(model, batch, tok)
    gpu = copy.deepcopy(model).cuda()
    runs = {graphs: sample_groups(gpu, batch, group_size=4, max_new_tokens=20, temperature=1.0, tokenizer=tok,
                                  eos_token_id=eos, generator=torch.Generator("cuda").manual_seed(0),
                                  cuda_graphs=graphs) for graphs in (True, False)}
    assert runs[True].decode_path == "static+cuda-graphs" and runs[False].decode_path == "static eager"
    assert torch.equal(runs[True].completion_ids_BT, runs[False].completion_ids_BT)
    torch.testing.assert_close(runs[True].logprobs_BT, runs[False].logprobs_BT, atol=1e-5, rtol=0)
    release_rollout_cache(gpu)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_audio_encoded_once_and_logprobs_match_forward(tiny, sampler):
    model, _, tok, batch = tiny
    calls = []
    hook = model.model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        r = sample_groups(model, batch, group_size=4, max_new_tokens=6, temperature=0.7, top_p=0.95,
                          tokenizer=tok, generator=torch.Generator().manual_seed(3), sampler=sampler)
        assert calls == [2]  # one pass over the P=2 clips for 8 samples
        lp = sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT,
                               group_size=4, temperature=0.7, chunk_size=5)
        assert calls == [2]  # reused, not re-encoded
        set_trainable(model, "projector,llm")
        sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, group_size=4)
        assert calls == [2, 2]  # a trainable projector needs its gradient: encoded again
        with torch.no_grad():
            sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, group_size=4)
        assert calls == [2, 2]  # ... but not without gradients
    finally:
        set_trainable(model, "llm")
        hook.remove()
    assert r.audio_embeds.shape[0] == 2 and not r.off_policy_B.any()
    with torch.no_grad():
        want = _forward_logprobs(model, batch, r.completion_ids_BT, r.mask_BT, 4, temperature=0.7)
    torch.testing.assert_close(lp, want, atol=2e-5, rtol=0)
    # The sampler records the same quantity at sampling time (batch shapes differ: fp32 noise only).
    torch.testing.assert_close(r.logprobs_BT, want, atol=2e-5, rtol=0)
    # A micro-batch of rows 3 and 6 (prompts 0 and 1) gives the same numbers.
    rows = torch.tensor([3, 6])
    sub = sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT[rows], r.mask_BT[rows],
                            group_size=4, temperature=0.7, rows_B=rows)
    torch.testing.assert_close(sub, want[rows], atol=2e-5, rtol=0)


def test_sequence_logprobs_has_gradients(tiny):
    model, _, tok, batch = tiny
    ids_BT, mask_BT = tokenize_targets(["the cat", "die Katze sitzt"], tok, max_new_tokens=8)
    head = model.lm_head.weight
    head.requires_grad_(True)
    try:
        lp = sequence_logprobs(model, batch, None, ids_BT, mask_BT, group_size=1)
        assert lp.requires_grad and lp.dtype == torch.float32
        (-lp.sum()).backward()
        assert head.grad is not None and head.grad.abs().sum() > 0
    finally:
        head.grad = None


def _first_token_probs(model, batch, temperature):
    with torch.no_grad():
        logits = model(**batch).logits[0, -1].float()
    logits[model.config.audio_token_id] = float("-inf")
    return (logits / temperature).softmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_frequencies_follow_softmax(tiny, temperature):
    model, _, tok, batch = tiny
    one = {k: v[1:] for k, v in batch.items()}  # the unpadded prompt
    N = 20000
    r = sample_groups(model, one, group_size=N, max_new_tokens=1, temperature=temperature, tokenizer=tok,
                      generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(r.completion_ids_BT[:, 0], minlength=len(tok)).double() / N
    p = _first_token_probs(model, one, temperature).double()
    # Binomial std sqrt(p(1-p)/N) <= 0.0035 at N=20000: allow 5 std per token plus 1e-4.
    tol = 5 * (p * (1 - p) / N).sqrt() + 1e-4
    assert ((freq - p).abs() <= tol).all(), float(((freq - p).abs() - tol).max())
    assert freq[model.config.audio_token_id] == 0


def test_top_p_keeps_only_the_nucleus(tiny):
    model, _, tok, batch = tiny
    one = {k: v[1:] for k, v in batch.items()}
    p = _first_token_probs(model, one, 1.0).double()
    top_p = 0.5
    sorted_p, order = p.sort(descending=True)
    # The nucleus: tokens whose mass strictly above them is < top_p.
    k = int(((sorted_p.cumsum(0) - sorted_p) < top_p).sum())
    nucleus = order[:k]
    assert 1 < k < len(tok) // 2
    N = 20000
    r = sample_groups(model, one, group_size=N, max_new_tokens=1, temperature=1.0, top_p=top_p,
                      tokenizer=tok, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(r.completion_ids_BT[:, 0], minlength=len(tok)).double() / N
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[nucleus] = False
    assert freq[outside].sum() == 0
    q = p[nucleus] / p[nucleus].sum()  # renormalised inside the nucleus
    tol = 5 * (q * (1 - q) / N).sqrt() + 1e-4
    assert ((freq[nucleus] - q).abs() <= tol).all()


def test_tokenize_targets_and_reference_samples(tiny):
    model, _, tok, batch = tiny
    ids_hello = tok("hello world", add_special_tokens=False).input_ids
    ids, mask = tokenize_targets(["hello world", ""], tok, max_new_tokens=50)
    # Row 0: the tokens then EOS; row 1 (empty text): EOS alone, then padding.
    assert ids[0, :len(ids_hello) + 1].tolist() == ids_hello + [tok.eos_token_id]
    assert mask.sum(1).tolist() == [len(ids_hello) + 1, 1]
    ids2, mask2 = tokenize_targets(["hello world"], tok, max_new_tokens=1)
    assert ids2.tolist() == [ids_hello[:1]] and mask2.tolist() == [[1]]  # truncated: no room for EOS

    G = 3
    r = sample_groups(model, batch, group_size=G, max_new_tokens=4, temperature=1.0, tokenizer=tok,
                      generator=torch.Generator().manual_seed(0))
    refs = ["hello world", "die Katze sitzt auf der Matte"]
    m = add_reference_samples(r, refs, tok, group_size=G, max_new_tokens=12)
    assert m.off_policy_B.tolist() == [False, False, True, False, False, True]
    assert m.texts[2] == "hello world" and m.texts[5] == "die Katze sitzt auf der Matte"
    assert m.texts[0] == r.texts[0] and m.texts[4] == r.texts[4]
    n_ref = len(tok(refs[1], add_special_tokens=False).input_ids) + 1
    assert int(m.mask_BT[5].sum()) == min(n_ref, 12) and m.logprobs_BT[5].abs().sum() == 0
    assert torch.equal(m.completion_ids_BT[0, :4], r.completion_ids_BT[0, :4])
    assert torch.equal(m.logprobs_BT[1, :4], r.logprobs_BT[1, :4])
    assert m.completion_ids_BT.shape[1] == max(4, min(n_ref, 12))


def test_recomputed_layers_give_the_same_logprobs_and_gradients(tiny):
    # Activation checkpointing trades memory for a second forward; values and gradients must not
    # change, and sampling afterwards must still use the KV cache (layers back out of training).
    from grpo_speech.model import recompute_layers

    model, _, tok, batch = tiny
    ids_BT, mask_BT = tokenize_targets(["the cat", "die Katze sitzt"], tok, max_new_tokens=8)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        model.zero_grad(set_to_none=True)
        lp = sequence_logprobs(model, batch, None, ids_BT, mask_BT, group_size=1)
        (-lp.sum()).backward()
        return lp.detach(), [p.grad.clone() for p in params]

    lp_plain, grads_plain = run()
    lm = model.model.language_model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        calls = []
        # A pre-hook: recomputation stops early, once the last saved tensor is rebuilt, which is
        # inside the MLP, so a forward (post) hook would not see the second pass.
        hook = lm.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        with recompute_layers(model):
            assert all(layer.training for layer in lm.layers)
            lp_ckpt, grads_ckpt = run()
        hook.remove()
        assert len(calls) == 2  # forward, then recomputed in backward
        assert not any(m.training for m in model.modules())
    finally:
        lm.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(lp_ckpt, lp_plain, rtol=0, atol=1e-6)
    for a, b in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
