"""Prompt templates: several wordings per task, one drawn at random per example (seeded).

`<|audio|>` marks where the processor puts the clip's audio embeddings; `{question}` is filled
from the example's prompt_fields. The pretraining domain has its own wordings, so a pretrained base
meets the evaluation prompts for the first time when it is fine-tuned.
"""
from __future__ import annotations

import random

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
# pretraining (`pretrain --instruct-share`): a model that has met one or two phrasings per task
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
