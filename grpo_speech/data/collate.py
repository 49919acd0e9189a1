"""Examples -> model inputs through the Granite Speech processor, with left padding for generation.

With transformers 5.x the processor returns input_ids (B, T), attention_mask (B, T),
input_features (B, F, 160) (pairs of 80-mel frames stacked) and input_features_mask (B, N): True
for the N audio embeddings each clip really has. Each `<|audio|>` in the prompt is expanded to the
clip's embedding count. `audio_embed_sizes`, returned by some versions, is dropped (the model's
forward does not take it).
"""
from __future__ import annotations

import random
import sys

import torch

from grpo_speech.data.audio import SAMPLE_RATE, AudioError, read_audio
from grpo_speech.data.prompts import draw_prompt, format_prompt, templates_for
from grpo_speech.data.rows import DataError
from grpo_speech.distributed import ceil_div

_REPORTED: set[str] = set()  # rows whose bad audio was already named on stderr by this process


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The chat-formatted prompt: an explicit system turn when `system` is given (prompts.system_prompt),
    then the user turn, then the assistant's header, where the answer starts."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.apply_chat_template(turns + [{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def collate(examples: list[dict], processor, *, rng: random.Random | list[random.Random] | None = None,
            templates: list[str] | None = None, system: str | None = None, skip_bad: bool = False,
            chosen: list[str] | None = None, with_waves: bool = False) -> dict:
    """examples: B dicts from load_split. Draws one template per example from `templates` (default:
    the target templates of each example's task), puts it in a chat after the system turn `system`
    (None: no system turn) and returns the processor's tensors plus
    `references`, `alternatives` (other correct answers), `ids` and `prompts` (chat-formatted),
    one per row kept, and `skipped`: the sources of rows left out. `rng` may also be a list of
    one generator per example (a prompt that does not depend on the batch it falls in); `chosen`
    gives each example's template drawn beforehand instead (no `rng` then). with_waves adds the
    16 kHz `waves` and their longest length, `audio_samples` (for pad_audio).

    Loading checked only each clip's header, so a body that does not decode is found here. It
    raises DataError naming the file and the source line; with skip_bad the row is left out (named
    once on stderr) and the batch holds the other rows: one bad clip in a large real dataset
    must neither crash a run hours in nor vanish silently."""
    if not examples:
        raise ValueError("collate needs at least one example")
    rngs = rng if isinstance(rng, list) else [rng] * len(examples)
    if chosen is not None:
        rngs = [None] * len(examples)
        if len(chosen) != len(examples):
            raise ValueError(f"collate: {len(chosen)} chosen templates for {len(examples)} examples")
    if len(rngs) != len(examples):
        raise ValueError(f"collate: {len(rngs)} generators for {len(examples)} examples")
    prompts, waves, kept, skipped = [], [], [], []
    for i, (ex, ex_rng) in enumerate(zip(examples, rngs)):
        pool = templates if templates is not None else templates_for(ex["task"])
        # Drawn for every row, kept or not: a bad row does not change the others' prompts.
        text = (format_prompt(chosen[i], ex["prompt_fields"]) if chosen is not None
                else draw_prompt(pool, ex["prompt_fields"], ex_rng))
        prompt = chat_prompt(processor.tokenizer, text, system)
        where = ex.get("where") or ex["id"]
        try:
            wave = read_audio(ex["audio"], name=ex["id"] if isinstance(ex["audio"], bytes) else "")
        except AudioError as err:
            if not skip_bad:
                raise DataError(f"{where}: {err} (set data.skip_bad=true to skip such rows)") from None
            if where not in _REPORTED:
                _REPORTED.add(where)
                print(f"warning: skipped {where}: {err}", file=sys.stderr, flush=True)
            skipped.append(where)
            continue
        prompts.append(prompt)
        waves.append(wave)
        kept.append(ex)
    if not kept:
        raise DataError(f"no row of this batch has audio that decodes ({', '.join(skipped)})")
    processor.tokenizer.padding_side = "left"
    batch = dict(processor(text=prompts, audio=waves, return_tensors="pt"))
    batch.pop("audio_embed_sizes", None)
    if with_waves:  # for pad_audio
        batch["audio_samples"] = max(len(w) for w in waves)
        batch["waves"] = waves
    batch["references"] = [ex["reference"] for ex in kept]
    batch["alternatives"] = [list(ex.get("alternatives", ())) for ex in kept]
    batch["ids"] = [ex["id"] for ex in kept]
    batch["prompts"] = prompts
    batch["skipped"] = skipped
    return batch


def audio_token_count(n_samples: int, window: int = 15, downsample: int = 5) -> int:
    """Audio embeddings (and <|audio|> positions) a clip of n_samples at 16 kHz gets: mel frames
    n // 160 + 1, pairs stacked, then windows of `window` frames projected to window // downsample
    each (Granite Speech's projector: window 15, downsample 5, so 3 embeddings per window)."""
    enc_len = (n_samples // 160 + 1) // 2
    return ceil_div(enc_len, window) * (window // downsample)


def prompt_text_tokens(tokenizer, templates: list[str], fields: dict, system: str | None = None
                       ) -> int:
    """Tokens of the longest chat-formatted wording of `templates` filled with `fields` (system
    turn and chat markers included), its one <|audio|> counted once: the one place a prompt's
    text is measured (fitting, prepare)."""
    chats = [chat_prompt(tokenizer, format_prompt(t, fields), system) for t in templates]
    return max(len(tokenizer(c, add_special_tokens=False).input_ids) for c in chats)


def prompt_tokens_key(tokenizer, templates: list[str], system: str | None = None,
                      projector: tuple[int, int] = (15, 5)) -> str:
    """What a prompt length depends on besides the example: the chat-formatted templates (chat
    template and system turn included), the vocabulary and the projector. A manifest's stored
    lengths are used only under the same key."""
    import hashlib
    rendered = [chat_prompt(tokenizer, t, system) for t in templates]
    blob = "\x00".join(rendered + [str(len(tokenizer)), str(tokenizer.name_or_path), str(projector)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prompt_lengths(examples: list[dict], templates: list[str], tokenizer, system: str | None = None,
                   projector: tuple[int, int] = (15, 5)) -> list[int]:
    """Each example's longest possible prompt in tokens: its audio positions plus the longest of
    its chat-formatted wordings (system turn and chat markers included). projector: (window,
    downsample) of the model's projector. A length a manifest stored under the same
    prompt_tokens_key is taken as it is; the others are measured once per distinct prompt fields
    (CoVoST's ast prompts have none, so 289k rows cost one measurement)."""
    key = prompt_tokens_key(tokenizer, templates, system, projector)
    text_tokens: dict[str, int] = {}
    lengths = []
    for ex in examples:
        if ex.get("prompt_tokens_key") == key and "prompt_tokens" in ex:
            lengths.append(ex["prompt_tokens"])
            continue
        fields_key = repr(sorted(ex["prompt_fields"].items()))
        if fields_key not in text_tokens:
            text_tokens[fields_key] = prompt_text_tokens(tokenizer, templates, ex["prompt_fields"],
                                                         system)
        n_audio = audio_token_count(round(ex["seconds"] * SAMPLE_RATE), *projector)
        lengths.append(n_audio - 1 + text_tokens[fields_key])
    return lengths


def fitting(examples: list[dict], templates: list[str], tokenizer, max_tokens: int,
            projector: tuple[int, int] = (15, 5), system: str | None = None) -> list[dict]:
    """Examples whose longest possible prompt (prompt_lengths) fits in `max_tokens` (paper:
    prompts <= 256 tokens)."""
    lengths = prompt_lengths(examples, templates, tokenizer, system, projector)
    return [e for e, n in zip(examples, lengths) if n <= max_tokens]


def pad_audio(batch: dict, processor, n_samples: int) -> dict:
    """The batch with its audio features computed as if its longest clip had `n_samples` samples.

    The processor zero-pads every clip to the batch's longest before the mel features, and the
    speech encoder has no padding mask: a clip's audio embeddings depend on how far its batch was
    padded. Ranks that share a step pad to the step's longest clip over all ranks, so each clip is
    encoded as one process would encode it. input_features_mask gains False columns for the
    projector windows the padding adds."""
    if n_samples <= batch["audio_samples"]:
        return batch
    waves = [torch.as_tensor(w) for w in batch["waves"]] + [torch.zeros(n_samples)]
    padded = processor.audio_processor(waves)
    mask = batch["input_features_mask"]
    extra = padded["input_features_mask"].shape[1] - mask.shape[1]
    return {**batch, "input_features": padded["input_features"][:-1].to(batch["input_features"].dtype),
            "input_features_mask": torch.nn.functional.pad(mask, (0, extra), value=False),
            "audio_samples": n_samples}


def to_device(batch: dict, device) -> dict:
    """The collated batch with its tensors on `device` (strings stay as they are): the one place a
    batch crosses from the data loader to the model's device."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
