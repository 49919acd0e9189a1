"""Recipes built on the trainer: pretraining the tiny base (`python -m grpo_speech pretrain`) and the
paper's experiment grid (`python -m grpo_speech.recipes.experiments`)."""
