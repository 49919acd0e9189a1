"""Granite Speech models: load, build the tiny default, choose what trains, reference policy, save.

The real models (IBM Granite Speech 3.3 2B/8B) and the embedded tiny default are the same class,
`GraniteSpeechForConditionalGeneration` from transformers; the tiny one is built here from a
scaled-down config and a byte-level BPE tokenizer with Granite's special tokens and chat template.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    GraniteSpeechConfig,
    GraniteSpeechFeatureExtractor,
    GraniteSpeechForConditionalGeneration,
    GraniteSpeechProcessor,
    PreTrainedTokenizerFast,
)

from grpo_speech import distributed
from grpo_speech.config import CHOICES, MODEL_PARTS, ModelConfig

EOS_TOKEN = "<|end_of_text|>"
AUDIO_TOKEN = "<|audio|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|start_of_role|>", "<|end_of_role|>", AUDIO_TOKEN]
# Granite 3.3's layout, without its system prompt: the prompt ends where the answer starts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)

# Sizes of the embedded default (about 3 M parameters). The conformer attends within blocks of
# `context_size` frames and pads the last one: 50 instead of the real 200 makes short clips much
# cheaper (a 2 s clip, 100 frames, is one padded 200 x 200 block of scores at 200 and two 50 x 50
# blocks at 50: 8x fewer).
TINY_SIZES = dict(
    enc_hidden=128, enc_layers=2, enc_heads=4, enc_output_dim=42, context_size=50,
    proj_hidden=128, proj_layers=1, proj_heads=4, proj_intermediate=256, proj_window=15,
    proj_downsample=5, lm_hidden=256, lm_layers=2, lm_heads=4, lm_kv_heads=4, lm_intermediate=768,
    embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=1.0,
    attention_multiplier=0.0, rope_theta=10_000_000.0, max_position_embeddings=4096, dropout=0.1,
)
# ibm-granite/granite-speech-3.3-2b; vocab 49160 and <|audio|> = 49159.
GRANITE_2B_SIZES = dict(
    enc_hidden=1024, enc_layers=16, enc_heads=8, enc_output_dim=256, context_size=200,
    proj_hidden=1024, proj_layers=2, proj_heads=16, proj_intermediate=4096, proj_window=15,
    proj_downsample=5, lm_hidden=2048, lm_layers=40, lm_heads=32, lm_kv_heads=8, lm_intermediate=8192,
    embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
    max_position_embeddings=131072, dropout=0.1,
)


def build_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (English and German), with Granite's special tokens
    (ids 0-3: <|end_of_text|> is eos and pad) and chat template. Left padding, for generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not texts:
        raise ValueError("build_tokenizer needs a non-empty list of training texts")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknowns
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, bos_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, audio_token_id: int, **sizes) -> GraniteSpeechConfig:
    """A Granite Speech config with the sizes of TINY_SIZES, overridden by `sizes` (keys of
    TINY_SIZES; GRANITE_2B_SIZES gives the real 2B shape). No speech LoRA: built from scratch."""
    unknown = set(sizes) - set(TINY_SIZES)
    if unknown:
        raise ValueError(f"tiny_config: unknown size keys {sorted(unknown)}; valid: {sorted(TINY_SIZES)}")
    s = {**TINY_SIZES, **sizes}
    encoder = dict(
        input_dim=160, num_layers=s["enc_layers"], hidden_dim=s["enc_hidden"], feedforward_mult=4,
        num_heads=s["enc_heads"], dim_head=s["enc_hidden"] // s["enc_heads"],
        output_dim=s["enc_output_dim"], context_size=s["context_size"],
        max_pos_emb=max(512, s["context_size"]), dropout=s["dropout"],
        conv_kernel_size=15, conv_expansion_factor=2,
    )
    projector = dict(
        model_type="blip_2_qformer", hidden_size=s["proj_hidden"], num_hidden_layers=s["proj_layers"],
        num_attention_heads=s["proj_heads"], intermediate_size=s["proj_intermediate"],
        encoder_hidden_size=s["enc_hidden"], cross_attention_frequency=1, max_position_embeddings=2048,
        hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=s["dropout"],
    )
    text = dict(
        model_type="granite", vocab_size=vocab_size, hidden_size=s["lm_hidden"],
        intermediate_size=s["lm_intermediate"], num_hidden_layers=s["lm_layers"],
        num_attention_heads=s["lm_heads"], num_key_value_heads=s["lm_kv_heads"],
        max_position_embeddings=s["max_position_embeddings"], rms_norm_eps=1e-5,
        embedding_multiplier=s["embedding_multiplier"], residual_multiplier=s["residual_multiplier"],
        # 0: 1/head_dim, Granite 3.3's rule
        attention_multiplier=s["attention_multiplier"] or s["lm_heads"] / s["lm_hidden"],
        logits_scaling=s["logits_scaling"], tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return GraniteSpeechConfig(
        text_config=text, encoder_config=encoder, projector_config=projector,
        audio_token_index=audio_token_id, has_lora_adapter=False,
        downsample_rate=s["proj_downsample"], window_size=s["proj_window"],
        tie_word_embeddings=True,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, **sizes):
    """(model, processor) with random weights, built without any download."""
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if audio_id is None or audio_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {AUDIO_TOKEN} token (use build_tokenizer)")
    config = tiny_config(len(tokenizer), audio_id, **sizes)
    config.text_config.eos_token_id = config.text_config.pad_token_id = tokenizer.eos_token_id
    config.text_config.bos_token_id = tokenizer.eos_token_id
    model = GraniteSpeechForConditionalGeneration(config)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    features = GraniteSpeechFeatureExtractor(projector_window_size=config.window_size,
                                             projector_downsample_rate=config.downsample_rate)
    processor = GraniteSpeechProcessor(audio_processor=features, tokenizer=tokenizer)
    return model, processor


def default_base_path() -> Path:
    """Where the pretrained tiny base lives: the package's assets, else the user cache."""
    packaged = Path(__file__).parent / "assets" / "tiny_base"
    return packaged if packaged.exists() else Path.home() / ".cache" / "grpo_speech" / "tiny_base"


def load_model(model_cfg):
    """(model, processor) from `model_cfg.path` (local directory or hub id; empty: the tiny base),
    on the CPU in float32, with the parts named in `model_cfg.train` trainable. `place_model`
    then puts it on its device in its compute dtype."""
    path = model_cfg.path
    if not path:
        path = default_base_path()
        if not path.exists():
            raise FileNotFoundError(
                f"no tiny base model at {Path(__file__).parent / 'assets' / 'tiny_base'} or {path}: "
                "run `make pretrain` first (or set model.path to a Granite Speech directory)")
        path = str(path)
    if model_cfg.dtype not in CHOICES["model.dtype"]:
        raise ValueError(f"model.dtype = {model_cfg.dtype!r}: expected one of {CHOICES['model.dtype']}")
    processor = GraniteSpeechProcessor.from_pretrained(path)
    # A directory holding config.json and adapter_config.json loads the base from the directory
    # and attaches the speech LoRA (frozen) as adapter "default".
    # float32 master weights whatever model.dtype says: that is the compute dtype, applied when
    # the model is placed (distributed.shard_model).
    model = GraniteSpeechForConditionalGeneration.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    parts = model_cfg.train
    if "lora" in _parse_parts(parts) and not has_speech_adapter(model) and model_cfg.lora_rank > 0:
        from peft import LoraConfig
        model.add_adapter(LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_rank,
                                     target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if model_cfg.gradient_checkpointing:  # the speech wrapper refuses it; its Granite LM supports it
        decoder(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n = set_trainable(model, parts)
    total = sum(p.numel() for p in model.parameters())
    distributed.print0(f"model {path}: {total / 1e6:.2f} M parameters, {n / 1e6:.3f} M trainable ({parts})")
    note = report_logit_scale(model)
    if note:
        distributed.print0(note)
    return model, processor


def _parse_parts(parts: str) -> list[str]:
    names = [p.strip() for p in parts.split(",") if p.strip()]
    bad = [p for p in names if p not in MODEL_PARTS]
    if bad or not names:
        raise ValueError(f"model.train = {parts!r}: expected a comma list of {MODEL_PARTS}")
    return names


def has_speech_adapter(model) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def _is_lora(name: str) -> bool:
    return "lora_" in name


def set_trainable(model, parts: str) -> int:
    """Freeze everything, then unfreeze the named parts; returns the trainable parameter count.
    `lora` on a model without an adapter trains projector+llm instead (with a printed note)."""
    names = _parse_parts(parts)
    if "lora" in names and not has_speech_adapter(model):
        distributed.print0("note: model.train asks for 'lora' but the model has no LoRA adapter: "
                           "training projector,llm instead")
        names = [n for n in names if n != "lora"] + ["projector", "llm"]
    prefixes = {"projector": "model.projector.", "encoder": "model.encoder.",
                "llm": "model.language_model.", "lora": None}
    for name, p in model.named_parameters():
        on = False
        for part in names:
            if part == "lora":
                on |= _is_lora(name)
            elif part == "llm":
                # The LM's own weights (lm_head is tied to the embeddings), not the LoRA on top.
                on |= (name.startswith(prefixes["llm"]) or name.startswith("lm_head.")) and not _is_lora(name)
            else:
                on |= name.startswith(prefixes[part])
        p.requires_grad_(on)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def speech_adapter(model, on: bool = True) -> None:
    """Set the speech LoRA on or off explicitly (generate() toggles it only when audio is passed;
    forward() never touches it). peft's enable_adapters() also marks the active adapter trainable:
    the requires_grad flags are restored so a frozen LoRA (reference, eval) stays frozen."""
    if not has_speech_adapter(model):
        return
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    if on:
        model.enable_adapters()
    else:
        model.disable_adapters()
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])


def make_reference(model):
    """Frozen copy of the current policy (speech LoRA on) for the KL term, in eval mode.

    Chosen: a deep copy that SHARES the frozen parameters with the policy (they never change) and
    copies only the trainable ones and the buffers (BatchNorm statistics move in train mode). With
    LoRA training it costs the LoRA's size, like a second adapter on the same base, but needs no
    adapter switching (peft's set_adapter/enable_adapters flip requires_grad as a side effect) and
    is exact for every choice of `model.train`. Disabling adapters is NOT a reference: it drops the
    speech LoRA."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    ref = copy.deepcopy(model, memo)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    speech_adapter(ref, True)
    return ref


def decoder(model):
    """The bare Granite LM (embeddings, layers, final norm) whose last_hidden_state feeds lm_head."""
    return model.model.language_model


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def logit_scale(model) -> float:
    """Granite's `text_config.logits_scaling` (8 for granite-speech-3.3-2b, 16 for the 8b): what the
    language model the checkpoints were trained and released with divides hidden @ lm_head.T by.
    transformers 4.x built the speech model's LM as GraniteForCausalLM, which divides, and vLLM's
    Granite divides; transformers 5.x gives GraniteSpeechForConditionalGeneration its own lm_head
    and does not (`forward_logit_scale`). Greedy decoding is the same either way; sampling
    temperature and every log-prob are not. Every path here (sampling, log-probs, evaluation)
    divides by this, whatever the installed forward does; tests/test_model.py checks it against a
    GraniteForCausalLM on the same weights."""
    return float(getattr(model.config.text_config, "logits_scaling", None) or 1.0)


@torch.no_grad()
def forward_logit_scale(model) -> float:
    """What the installed transformers' `model(...).logits` divides hidden @ lm_head.T by, measured
    on one text token (no audio): logits_scaling when its forward applies it, else 1."""
    trained = logit_scale(model)
    if trained == 1.0:
        return 1.0
    ids = torch.zeros(1, 1, dtype=torch.long, device=lm_head_weight(model).device)
    hidden = decoder(model)(input_ids=ids).last_hidden_state[:, -1]
    raw = model.get_output_embeddings()(hidden).float()
    installed = model(input_ids=ids).logits[:, -1].float()
    return trained if torch.allclose(installed * trained, raw, rtol=1e-3, atol=1e-4) else 1.0


def report_logit_scale(model) -> str | None:
    """One line when the installed forward's logits differ from the trained model's (None if not)."""
    trained, installed = logit_scale(model), forward_logit_scale(model)
    if trained == installed:
        return None
    return (f"note: the installed transformers' {type(model).__name__}.forward does not divide its "
            f"logits by text_config.logits_scaling={trained:g} as the released model's language "
            f"model does (transformers 4.x, vLLM); sampling, log-probs and evaluation here use the "
            f"trained model's logits, lm_head(h) / {trained:g}")


@torch.no_grad()
def base_identity(model, path: str) -> dict:
    """What an adapter-sized checkpoint applies to: the base's path or hub id, a hash of its
    config, and a hash of a strided sample (up to 256 values) of every frozen weight, taken on the
    loaded, unsharded model (any other base, or the same name with other weights, differs)."""
    import hashlib
    weights = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad or _is_lora(name):
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
        weights.update(name.replace(".base_layer.", ".").encode() + sample.tobytes())
    config = model.config.to_json_string(use_diff=False).encode()
    return {"path": path or "tiny base", "config_sha256": hashlib.sha256(config).hexdigest(),
            "weights_sha256": weights.hexdigest()}


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of the model without its LoRA: peft's `q_proj.base_layer.weight` -> `q_proj.weight`."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not _is_lora(k)}


def save_model(model, processor, out_dir: str | os.PathLike) -> None:
    """Write an HF-format directory (safetensors) that from_pretrained(dir) loads on its own.
    With a LoRA attached, base and adapter are saved separately: the model's own save_pretrained
    would store peft's renamed q/v keys, which reload as re-initialised weights. Atomic: written
    to a temporary directory that replaces `out_dir` in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if has_speech_adapter(model):
        with torch.device("meta"):
            base = GraniteSpeechForConditionalGeneration(model.config)
        base.load_state_dict(_base_state_dict(model), strict=False, assign=True)
        missing = [k for k, v in base.state_dict().items() if v.is_meta]
        if missing:
            raise RuntimeError(f"save_model: base weights missing from the model: {missing[:5]}")
        base.generation_config = model.generation_config
        base.save_pretrained(tmp)
        from transformers import PreTrainedModel
        # The parent class's save_pretrained writes only the active adapter when one is loaded.
        name = model.active_adapters()[0]
        model.peft_config[name].base_model_name_or_path = str(out_dir.resolve())
        PreTrainedModel.save_pretrained(model, tmp)
    else:
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put the fully written directory `tmp` in the place of `out_dir` (a rename each way)."""
    old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def lora_only(model) -> bool:
    """Only the LoRA trains: best/ is then a peft adapter directory over the base."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(names) and all(_is_lora(n) for n in names)


def save_best(model, processor, out_dir: Path, dist_, base_path: str = "") -> None:
    """save_model for a model that may be sharded: ranks gather the full weights (a collective),
    rank 0 writes them as one whole model, and every rank waits for the write. When only the LoRA
    trains, best/ is a standard peft adapter directory (adapter_config.json naming `base_path`
    as base_model_name_or_path, adapter_model.safetensors, the processor): transformers'
    from_pretrained(best/) and load_model load it over the base, and so does
    PeftModel.from_pretrained(base, best/) on a base without a speech LoRA."""
    if lora_only(model) and base_path:
        from grpo_speech.checkpoint import _trainable_state
        state = _trainable_state(model)  # the LoRA alone is gathered
        if dist_.is_main:
            save_adapter(model, state, processor, out_dir, base_path)
        distributed.barrier()
        return
    state = distributed.full_state_dict(model, dist_)  # None when the model is not sharded
    if dist_.is_main:
        save_model(model if state is None else whole_copy(model, state), processor, out_dir)
    distributed.barrier()


def save_adapter(model, lora_state: dict[str, torch.Tensor], processor, out_dir: Path, base_path: str) -> None:
    """Write a peft adapter directory atomically: the LoRA tensors under peft's key names
    (`base_model.model.` + the parameter name without the adapter name), its config with
    base_model_name_or_path, and the processor."""
    import json

    import safetensors.torch

    name = model.active_adapters()[0]
    tensors = {"base_model.model." + k.replace(f".{name}.", "."): v.contiguous() for k, v in lora_state.items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = model.peft_config[name].to_dict()
    config["base_model_name_or_path"] = str(Path(base_path).resolve()) if Path(base_path).is_dir() else base_path
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    safetensors.torch.save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)


def export_merged(src: str, out_dir: str) -> Path:
    """A full model directory from `src` (a run's best/, adapter or whole): the LoRA merged into
    the q/v weights (W + B A * alpha / r), no adapter left. Loads alone with from_pretrained."""
    from peft.tuners.lora import LoraLayer

    model, processor = load_model(ModelConfig(path=src, train="projector"))
    if has_speech_adapter(model):
        speech_adapter(model, True)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        with torch.device("meta"):
            merged = GraniteSpeechForConditionalGeneration(model.config)
        merged.load_state_dict(_base_state_dict(model), strict=True, assign=True)
        merged.tie_weights()
        merged.config.has_lora_adapter = False  # nothing to switch on and off any more
        merged.generation_config = model.generation_config
        model = merged
    save_model(model, processor, out_dir)
    return Path(out_dir)


def whole_copy(model, state: dict):
    """An unsharded model (same class, config and adapters) holding the gathered `state`."""
    with torch.device("meta"):
        whole = GraniteSpeechForConditionalGeneration(model.config)
        for name, peft_cfg in getattr(model, "peft_config", {}).items():
            whole.add_adapter(peft_cfg, adapter_name=name)
    whole.load_state_dict(state, strict=True, assign=True)
    whole.tie_weights()
    whole.generation_config = model.generation_config
    return whole


@contextlib.contextmanager
def recompute_layers(model, on: bool = True):
    """Activation checkpointing of the decoder layers for the passes inside this block.

    transformers checkpoints a layer only when `gradient_checkpointing` is enabled AND the layer is
    in training mode, and then also turns its KV cache off. The loop keeps the model in eval mode
    (no dropout), so this sets the training flag of the layer objects alone (their dropout children
    stay in eval mode) for the log-prob passes with gradient, and clears it again for sampling.
    """
    layers = decoder(model).layers if on else []
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def place_model(model, model_cfg, dist_):
    """The loaded model on this rank's device, in `model_cfg.dtype` compute with float32 master
    weights (sharded with FSDP2 when that takes more than a move; see distributed.shard_model).
    float32 compute needs no mixed precision: no FSDP2 policy."""
    mp_dtype = None if model_cfg.dtype == "float32" else getattr(torch, model_cfg.dtype)
    return distributed.shard_model(model, dist_, mp_dtype=mp_dtype)
