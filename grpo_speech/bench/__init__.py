"""Benchmarks and the device check, run through `python -m grpo_speech bench logprobs|rollout|gpu`."""
