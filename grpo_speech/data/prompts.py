"""Prompt templates: several wordings per task, one drawn at random per example (seeded).

`<|audio|>` marks where the processor puts the clip's audio embeddings; `{question}` is filled
from the example's prompt_fields. The pretraining domain has its own wordings, so a pretrained base
meets the evaluation prompts for the first time when it is fine-tuned.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

AUDIO = "<|audio|>"

TEMPLATES = {
    "target": {
        "sqa": ["Listen to the audio <|audio|> and answer the following question: {question}",
                "<|audio|> Answer the question about the recording: {question}",
                "Here is a short recording <|audio|> {question} Answer in a full sentence.",
                "<|audio|> Based on what you heard, {question}"],
        "ast": ["<|audio|> listen to the speech and translate it into German.",
                "<|audio|> translate the spoken English into German.",
                "Listen to <|audio|> and give the German translation.",
                "<|audio|> What is the German translation of this speech?"],
        "asr": ["<|audio|> can you transcribe the speech into a written format?",
                "<|audio|> write down what is said in the recording.",
                "Transcribe the audio <|audio|> please.",
                "<|audio|> what does the speaker say?"],
    },
    "pretrain": {
        "sqa": ["<|audio|> Question: {question} Answer:",
                "Audio: <|audio|> Please answer: {question}"],
        "ast": ["<|audio|> German:", "Audio: <|audio|> In German, please."],
        "asr": ["<|audio|> Transcript:", "Audio: <|audio|> Write the words."],
    },
}

# More wordings of the pretrain tasks (none of them a target wording), for the last phase of
# pretraining (`pretrain pretrain.instruct_share=S`): a model that has met one or two phrasings per task
# learns those strings rather than the instruction. Measured on the committed base: the target ast
# test scores 19.6 greedy BLEU with the pretrain wordings and 7.2 with the target ones; 400 more
# steps on all of these wordings raise the latter to 12.9 (to 7.4 on the two wordings alone).
TEMPLATES["pretrain-wide"] = {
    "sqa": TEMPLATES["pretrain"]["sqa"] + [
        "<|audio|> {question}",
        "Recording: <|audio|> Q: {question} A:",
        "Hear the clip <|audio|> then reply. {question}",
        "<|audio|> Use the recording to answer this. {question}",
        "Clip <|audio|> {question} Reply in one sentence.",
        "{question} The answer is in this audio: <|audio|>"],
    "ast": TEMPLATES["pretrain"]["ast"] + [
        "<|audio|> Say this in German.",
        "Put this recording into German: <|audio|>",
        "<|audio|> German translation:",
        "Clip: <|audio|> Translate it to German.",
        "<|audio|> Render the English words in German.",
        "Translate the recording <|audio|> into German.",
        "<|audio|> How would a German speaker say that?",
        "In German: <|audio|>"],
    "asr": TEMPLATES["pretrain"]["asr"] + [
        "<|audio|> Write out the speech.",
        "Clip: <|audio|> Which words are spoken?",
        "<|audio|> Transcribe it.",
        "Type what you hear: <|audio|>",
        "<|audio|> Put the recording into English text.",
        "Recording <|audio|> Transcription:"],
}


# The system turn of the Granite Speech 3.3 model card, word for word (its examples pass it).
# Without a system turn, Granite 3.3's chat template writes one holding the day's date
# (`strftime_now`): the prompt would change every day, a resumed run would not replay its prompts,
# and every prompt would be about 50 tokens longer than the instruction alone.
GRANITE_SYSTEM_PROMPT = ("Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
                         "You are Granite, developed by IBM. You are a helpful AI assistant")


def dates_prompts(chat_template: str | None) -> bool:
    """True when a chat template writes the day's date into prompts that carry no system turn."""
    return "strftime_now" in (chat_template or "")


def system_prompt(setting: str, chat_template: str | None) -> str | None:
    """The system turn to send (None: none) for `data.system_prompt`:
    "auto": the model card's fixed Granite prompt when the template would otherwise date the
    prompt (Granite 3.3), none for a template that adds nothing (the tiny base);
    "none": no system turn, refused when the template would then date the prompt;
    any other text: that system turn, as given."""
    if setting == "auto":
        return GRANITE_SYSTEM_PROMPT if dates_prompts(chat_template) else None
    if setting == "none":
        if dates_prompts(chat_template):
            raise ValueError("data.system_prompt=none, but this model's chat template then writes the "
                             "day's date into every prompt (strftime_now): set data.system_prompt to "
                             "auto or to a fixed text")
        return None
    return setting


def instruction_templates(task: str, configured: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The task's instruction wordings: `data.instructions` when set, else TEMPLATES' target ones."""
    return list(configured) if configured else templates_for(task)


def check_instructions(task: str, templates) -> None:
    """Each wording holds <|audio|> once and only the fields the task's examples have."""
    fields = {"question": "?"} if task == "sqa" else {}
    for t in templates:
        format_prompt(t, fields)
    if task == "sqa" and any("{question}" not in t for t in templates):
        raise ValueError("every sqa instruction must hold {question}: "
                         f"{[t for t in templates if '{question}' not in t]}")


@dataclass(frozen=True)
class Prompts:
    """What every prompt of a run is made of: the instruction wordings and the system turn."""
    templates: tuple[str, ...]
    system: str | None
    rendered: str = ""
    """The chat-formatted prompt of the run's first train example with the first wording: the
    run's record of its prompts (prompt.json, checkpoints), compared on resume."""


def run_prompts(cfg, tokenizer) -> Prompts:
    """The prompts of a run from `data.instructions` and `data.system_prompt` (ValueError when the
    setting cannot give the same prompt every day)."""
    from grpo_speech.config import ConfigError
    try:
        system = system_prompt(cfg.data.system_prompt, tokenizer.chat_template)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return Prompts(tuple(instruction_templates(cfg.task, cfg.data.instructions)), system)


def templates_for(task: str, domain: str = "target") -> list[str]:
    try:
        return TEMPLATES[domain][task]
    except KeyError:
        raise ValueError(f"no prompt templates for task {task!r} in domain {domain!r}") from None


def format_prompt(template: str, fields: dict) -> str:
    """Fill a template; a template naming a field the example lacks is an error, not a blank."""
    if template.count(AUDIO) != 1:
        raise ValueError(f"prompt template must hold {AUDIO} exactly once: {template!r}")
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(f"prompt template {template!r} needs field {e} (have {sorted(fields)})") from None


def draw_prompt(templates: list[str], fields: dict, rng: random.Random) -> str:
    return format_prompt(rng.choice(templates), fields)
