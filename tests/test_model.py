"""Granite Speech models: tiny build, trainable parts, LoRA, reference policy, logit scale, save/load.

Run: .venv/bin/python -m pytest -q tests/test_model.py
"""
import torch
from peft import LoraConfig

from grpo_speech.config import ModelConfig
from grpo_speech.model import (
    GRANITE_2B_SIZES, build_tiny_model, build_tokenizer, load_model, make_reference,
    save_model, set_trainable, speech_adapter, tiny_config,
)
from grpo_speech.rollout import sequence_logprobs
from transformers import GraniteSpeechForConditionalGeneration

TEXTS = ["the cat sits on the mat", "die Katze sitzt auf der Matte", "Über den Fluss fährt ein Boot",
         "a man reads a book"] * 10
SIZES = dict(enc_hidden=64, enc_layers=2, enc_heads=2, proj_hidden=64, proj_heads=2, proj_intermediate=128,
             lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=4, lm_intermediate=128)


def _tiny(**sizes):
    tok = build_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model, proc = build_tiny_model(tok, **{**SIZES, **sizes})
    g = torch.Generator().manual_seed(0)
    audio = [torch.randn(16000, generator=g) * 0.1, torch.randn(8000, generator=g) * 0.1]
    batch = proc(["<|audio|> translate", "what is said? <|audio|> answer"], audio, return_tensors="pt")
    return model, proc, tok, batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _add_lora(model):
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # peft starts lora_B at 0 (a no-op adapter): make it change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_tokenizer_special_tokens_and_template():
    tok = build_tokenizer(TEXTS, vocab_size=300)
    assert tok.convert_tokens_to_ids(["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>"]) == [0, 1, 2, 3]
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "<|audio|> translate"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|start_of_role|>user<|end_of_role|><|audio|> translate<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    ids = tok("x <|audio|> y", add_special_tokens=False).input_ids
    assert ids.count(3) == 1  # the audio marker is one token, never split
    assert tok.decode(tok("Über fährt Öl", add_special_tokens=False).input_ids) == "Über fährt Öl"


def test_tiny_forward_backward_and_trainable_parts(capsys):
    model, _, _, batch = _tiny()
    n_total = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_total < 1e6
    n = set_trainable(model, "lora")  # no LoRA in a from-scratch model: projector+llm instead
    assert "no LoRA adapter" in capsys.readouterr().out
    assert all(not p.requires_grad for p in model.model.encoder.parameters())
    assert all(p.requires_grad for p in model.model.projector.parameters())
    assert n == n_total - sum(p.numel() for p in model.model.encoder.parameters())
    logits = model(**batch).logits
    loss = logits.float().log_softmax(-1)[..., 5].mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.projector.linear.weight.grad.abs().sum() > 0
    assert model.model.encoder.input_linear.weight.grad is None
    assert set_trainable(model, "encoder") == sum(p.numel() for p in model.model.encoder.parameters())


def test_lora_loads_trainable_and_round_trips(tmp_path):
    model, proc, _, batch = _tiny()
    _add_lora(model)
    model.eval()
    before = _logits(model, batch)
    save_model(model, proc, tmp_path / "lora_model")
    files = sorted(p.name for p in (tmp_path / "lora_model").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" in files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    # transformers alone reloads base + adapter with the same outputs (q/v base weights intact).
    plain = GraniteSpeechForConditionalGeneration.from_pretrained(tmp_path / "lora_model").eval()
    assert torch.equal(_logits(plain, batch), before)

    loaded, _ = load_model(ModelConfig(path=str(tmp_path / "lora_model"), train="lora"))
    loaded.eval()
    assert torch.equal(_logits(loaded, batch), before)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r=4 on q and v (64 -> 64) in 2 layers: 2 layers x 2 modules x (4x64 + 64x4) = 2048.
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 2048
    loss = loaded(**batch).logits.float().log_softmax(-1)[..., 7].mean()
    loss.backward()
    grads = [p.grad for n, p in loaded.named_parameters() if "lora_A" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_load_round_trip_is_exact(tmp_path):
    model, proc, _, batch = _tiny()
    model.eval()
    before = _logits(model, batch)
    save_model(model, proc, tmp_path / "m")
    save_model(model, proc, tmp_path / "m")  # overwriting an existing directory works
    loaded, proc2 = load_model(ModelConfig(path=str(tmp_path / "m"), train="llm"))
    loaded.eval()
    assert torch.equal(_logits(loaded, batch), before)
    assert proc2.tokenizer.chat_template == proc.tokenizer.chat_template


def test_reference_equals_policy_then_stays_fixed():
    model, _, tok, batch = _tiny()
    _add_lora(model)
    set_trainable(model, "lora")
    ref = make_reference(model)
    model.eval()
    assert torch.equal(_logits(ref, batch), _logits(model, batch))
    # Frozen weights are shared, not copied; LoRA weights are copies.
    assert ref.model.encoder.input_linear.weight is model.model.encoder.input_linear.weight
    lora_names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    pol, rp = dict(model.named_parameters()), dict(ref.named_parameters())
    assert all(pol[n] is not rp[n] and not rp[n].requires_grad for n in lora_names)
    ref_before = _logits(ref, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**batch).logits.float().log_softmax(-1)[..., 7].mean().backward()
    opt.step()
    model.eval()
    assert torch.equal(_logits(ref, batch), ref_before)
    assert not torch.equal(_logits(model, batch), ref_before)


def test_log_prob_passes_switch_the_speech_lora_on():
    model, _, tok, batch = _tiny()
    _add_lora(model)
    set_trainable(model, "llm")  # LoRA frozen
    model.eval()
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        on = sequence_logprobs(model, batch, None, ids, mask, group_size=1)
        model.disable_adapters()  # what generate() leaves behind after a text-only call
        off_direct = model(**batch).logits
        again = sequence_logprobs(model, batch, None, ids, mask, group_size=1)
        on_direct = model(**batch).logits
    torch.testing.assert_close(again, on, atol=0, rtol=0)
    assert not torch.equal(off_direct, on_direct)
    # Switching the adapter on did not make the frozen LoRA trainable (peft's side effect).
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    speech_adapter(model, False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_granite_2b_shape_has_3_billion_parameters():
    config = tiny_config(49160, 49159, **GRANITE_2B_SIZES)
    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.model.encoder.parameters())
    # The released 3.3-2b instantiates to 3.009 B, its encoder to 440 M.
    assert abs(n - 3.009e9) < 0.01e9, n
    assert abs(n_enc - 440e6) < 5e6, n_enc
