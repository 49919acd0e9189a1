"""grpo_speech: GRPO for speech-aware language models."""
__version__ = "0.1.0"
