"""The released Granite Speech checkpoints as trained: logits scaling, a pinned prompt, the released
adapter's key layout, a hub-like directory, adapter-sized checkpoints.

Run: .venv/bin/python -m pytest -q tests/test_released_model.py
"""
import pytest
import torch
from transformers import GraniteForCausalLM

from grpo_speech.model import (
    build_tiny_model, build_tokenizer, decoder, forward_logit_scale, logit_scale, report_logit_scale,
)
from grpo_speech import rollout as rollout_module
from grpo_speech.rollout import sample_groups, sequence_logprobs

TEXTS = ["the cat sits on the mat", "die Katze sitzt auf der Matte", "hello world",
         "a man reads a book", "ein Mann liest ein Buch"] * 10
# As in test_rollout.py: multipliers 1 and wide random LM weights make a random model whose
# output changes from token to token.
SIZES = dict(enc_hidden=64, enc_layers=2, enc_heads=2, proj_hidden=64, proj_heads=2, proj_intermediate=128,
             lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=128,
             residual_multiplier=1.0, embedding_multiplier=1.0)


def _speech_model(logits_scaling: float):
    tok = build_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(0)
    model, proc = build_tiny_model(tok, logits_scaling=logits_scaling, **SIZES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "language_model" in name:
                p.normal_(0, 0.15)
    model.eval()
    g = torch.Generator().manual_seed(0)
    audio = [torch.randn(16000, generator=g) * 0.1, torch.randn(24000, generator=g) * 0.1]
    batch = proc(["<|audio|> hi", "say <|audio|> something long the cat"], audio, return_tensors="pt")
    return model, proc, tok, batch


def _trained_lm(model) -> GraniteForCausalLM:
    """The language model as Granite Speech was trained and released with it (transformers 4.x's
    speech model held a GraniteForCausalLM): the same text weights under GraniteForCausalLM."""
    causal = GraniteForCausalLM(model.config.text_config).eval()
    state = {f"model.{k}": v for k, v in decoder(model).state_dict().items()}
    state["lm_head.weight"] = model.get_output_embeddings().weight
    causal.load_state_dict(state, strict=True)
    return causal


def _trained_logprobs(causal, model, batch, audio_embeds, ids_BT, mask_BT, G, temperature):
    """log_softmax(GraniteForCausalLM logits / temperature) at the completion tokens, on the same
    input embeddings (prompt with audio scattered in, then the completion)."""
    embeds_PTH = rollout_module._prompt_embeds(model, batch, audio_embeds)
    attn_PT = batch["attention_mask"]
    Tp = attn_PT.shape[1]
    x = torch.cat([embeds_PTH.repeat_interleave(G, 0), model.get_input_embeddings()(ids_BT)], dim=1)
    attn = torch.cat([attn_PT.repeat_interleave(G, 0), mask_BT.to(attn_PT.dtype)], dim=1)
    logits = causal(inputs_embeds=x, attention_mask=attn, position_ids=rollout_module._positions(attn)).logits
    lp = (logits[:, Tp - 1:-1].float() / temperature).log_softmax(-1)
    return lp.gather(2, ids_BT[..., None])[..., 0] * mask_BT


@pytest.mark.parametrize("sampler", ["static", "dynamic"])
@torch.no_grad()
def test_sampling_and_logprobs_follow_the_trained_logits_scaling(sampler):
    model, _, tok, batch = _speech_model(logits_scaling=8.0)
    causal = _trained_lm(model)
    G, T, temperature = 3, 12, 0.7
    # An EOS id that one row samples and another does not: rows end at different lengths.
    free = sample_groups(model, batch, group_size=G, max_new_tokens=T, temperature=temperature, tokenizer=tok,
                         eos_token_id=-1, generator=torch.Generator().manual_seed(3), sampler=sampler)
    row0, row5 = free.completion_ids_BT[0].tolist(), free.completion_ids_BT[5].tolist()
    eos = next(t for t in row0[2:] if t not in row5)
    r = sample_groups(model, batch, group_size=G, max_new_tokens=T, temperature=temperature, tokenizer=tok,
                      eos_token_id=eos, generator=torch.Generator().manual_seed(3), sampler=sampler)
    lengths = r.mask_BT.sum(1)
    assert lengths.min() < lengths.max() == T
    want = _trained_logprobs(causal, model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, G, temperature)
    # The sampling distribution: sampling-time log-probs are those of the trained LM at T = 0.7.
    torch.testing.assert_close(r.logprobs_BT, want, atol=1e-5, rtol=0)
    # The teacher-forced log-probs of the loss, the same.
    got = sequence_logprobs(model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, group_size=G,
                            temperature=temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Greedy decoding is the same with or without the division: only sampling and log-probs move.
    assert (want - _trained_logprobs(causal, model, batch, r.audio_embeds, r.completion_ids_BT, r.mask_BT, G,
                                     temperature / 8.0)).abs().max() > 0.1


@torch.no_grad()
def test_the_installed_forward_is_measured_and_reported():
    model, _, _, batch = _speech_model(logits_scaling=8.0)
    assert logit_scale(model) == 8.0
    installed = forward_logit_scale(model)
    hidden = model.model(**batch).last_hidden_state
    raw = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(model(**batch).logits * installed, raw, atol=1e-5, rtol=1e-5)
    note = report_logit_scale(model)
    assert (note is None) == (installed == 8.0)
    if note:
        assert "logits_scaling=8" in note and "lm_head(h) / 8" in note
    plain, *_ = _speech_model(logits_scaling=1.0)
    assert logit_scale(plain) == 1.0 and report_logit_scale(plain) is None


# ---- a pinned prompt ----

# Granite 3.3's chat template as far as prompts go (ibm-granite/granite-3.3-*-instruct,
# tokenizer_config.json): a system turn given is used as is; without one the template writes its
# own, holding the day's date.
GRANITE_33_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = \"Knowledge Cutoff Date: April 2024.\\nToday's Date: \" + strftime_now('%B %d, %Y')"
    " + \".\\nYou are Granite, developed by IBM. You are a helpful AI assistant.\" %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
    "{%- endfor %}"
)


def _on_day(monkeypatch, day: str):
    import datetime as real
    from transformers.utils import chat_template_utils

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime.fromisoformat(day)

    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)


def _wav_bytes(seconds: float) -> bytes:
    import io

    import numpy as np
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype("float32"),
             16000, format="WAV")
    return buf.getvalue()


def test_prompts_are_the_same_tokens_on_every_day(monkeypatch):
    import random

    from grpo_speech.config import load_config
    from grpo_speech.data import collate
    from grpo_speech.data.prompts import GRANITE_SYSTEM_PROMPT, run_prompts
    from grpo_speech.data.rows import example

    _, proc, tok, _ = _speech_model(logits_scaling=8.0)
    tok.chat_template = GRANITE_33_STYLE_TEMPLATE
    prompts = run_prompts(load_config(None, ["task=sqa"]), tok)
    assert prompts.system == GRANITE_SYSTEM_PROMPT  # auto: the model card's fixed system turn
    examples = [example("a", "sqa", _wav_bytes(1.0), 1.0, {"question": "Who speaks?"}, "A man."),
                example("b", "sqa", _wav_bytes(1.5), 1.5, {"question": "Where is the cat?"}, "On the mat.")]

    def tokens(day, system):
        _on_day(monkeypatch, day)
        batch = collate(examples, proc, rng=random.Random(0), templates=list(prompts.templates), system=system)
        return batch["input_ids"].tolist(), batch["prompts"]

    ids_1, text_1 = tokens("2026-12-07T23:59:00", prompts.system)
    ids_2, text_2 = tokens("2026-12-08T00:01:00", prompts.system)
    assert ids_1 == ids_2 and text_1 == text_2
    assert text_1[0].startswith("<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\n"
                                "Today's Date: April 9, 2025.\n")
    # Without the explicit turn the template dates the prompt: what the fixed turn prevents.
    assert tokens("2026-12-07T23:59:00", None)[1] != tokens("2026-12-08T00:01:00", None)[1]


def test_system_prompt_settings():
    from grpo_speech.config import ConfigError, load_config
    from grpo_speech.data.prompts import run_prompts
    from grpo_speech.data.collate import chat_prompt

    tok = build_tokenizer(TEXTS, vocab_size=300)
    # The tiny base's template adds nothing: auto sends no system turn and its prompts stay as they were.
    tiny = run_prompts(load_config(None, ["task=ast"]), tok)
    assert tiny.system is None
    assert chat_prompt(tok, "<|audio|> x", tiny.system) == \
        "<|start_of_role|>user<|end_of_role|><|audio|> x<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    tok.chat_template = GRANITE_33_STYLE_TEMPLATE
    with pytest.raises(ConfigError, match="date"):
        run_prompts(load_config(None, ["data.system_prompt=none"]), tok)
    own = run_prompts(load_config(None, ["data.system_prompt=You translate.",
                                         'data.instructions=["<|audio|> German, please."]']), tok)
    assert own.system == "You translate." and own.templates == ("<|audio|> German, please.",)
    with pytest.raises(ConfigError, match="question"):
        load_config(None, ["task=sqa", 'data.instructions=["<|audio|> answer"]'])


# ---- the released adapter ----

def _lora_model():
    from peft import LoraConfig

    tok = build_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model, proc = build_tiny_model(tok, **{**SIZES, "lm_heads": 4, "lm_kv_heads": 4})
    model.config.has_lora_adapter = True  # as the released config says
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # a LoRA that changes the output (peft starts lora_B at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    batch = proc(["<|audio|> translate"], [torch.randn(16000, generator=torch.Generator().manual_seed(1)) * 0.1],
                 return_tensors="pt")
    return model, proc, batch


def _logits_with_adapter(model, batch):
    from grpo_speech.model import speech_adapter
    speech_adapter(model, True)
    with torch.no_grad():
        return model(**batch).logits


def _loaded(path):
    from grpo_speech.config import ModelConfig
    from grpo_speech.model import load_model
    model, _ = load_model(ModelConfig(path=str(path), train="lora"))
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_B and all(p.abs().sum() > 0 for p in lora_B)  # the adapter came in, not a fresh zero one
    return model.eval()


def test_the_released_adapter_layout_loads(tmp_path):
    # The released granite-speech-3.3 checkpoints were saved with transformers 4.x, whose speech model
    # held its LM as `language_model` = GraniteForCausalLM: adapter keys read
    # base_model.model.language_model.model.layers.N..., where transformers 5.x writes
    # base_model.model.model.language_model.layers.N...; the base weights are written in 4.x names
    # by transformers 5.x itself (encoder.*, projector.*, language_model.model.*).
    import safetensors.torch as st

    from grpo_speech.model import save_model
    model, proc, batch = _lora_model()
    want = _logits_with_adapter(model, batch)
    save_model(model, proc, tmp_path / "released")
    path = tmp_path / "released" / "adapter_model.safetensors"
    adapter = st.load_file(path)
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in adapter)
    st.save_file({k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
                  for k, v in adapter.items()}, path, metadata={"format": "pt"})
    base_keys = st.load_file(tmp_path / "released" / "model.safetensors").keys()
    assert any(k.startswith("language_model.model.layers.") for k in base_keys)
    torch.testing.assert_close(_logits_with_adapter(_loaded(tmp_path / "released"), batch), want, atol=0, rtol=0)


def test_a_hub_like_adapter_directory_loads_its_base(tmp_path):
    # A directory standing in for a hub id that holds an adapter and the processor only: the base
    # comes from adapter_config.json's base_model_name_or_path.
    import json
    import shutil

    from grpo_speech.model import save_model
    model, proc, batch = _lora_model()
    want = _logits_with_adapter(model, batch)
    save_model(model, proc, tmp_path / "base")
    hub = tmp_path / "org--speech-adapter"
    hub.mkdir()
    for f in (tmp_path / "base").iterdir():
        if not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, hub / f.name)
    cfg = json.loads((hub / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (hub / "adapter_config.json").write_text(json.dumps(cfg))
    assert not (hub / "config.json").exists()
    torch.testing.assert_close(_logits_with_adapter(_loaded(hub), batch), want, atol=0, rtol=0)
