"""Which rows an evaluation scores: whole splits by default, a fixed-seed sample under a limit, and
the caption that says how many test rows were left out.

    .venv/bin/python -m pytest -q tests/test_eval_sample.py
"""
from grpo_speech.config import load_config
from grpo_speech.evaluate import _left_out, eval_sample


def rows(n):
    return [{"id": f"row-{i}"} for i in range(n)]


def test_no_limit_or_a_limit_at_least_the_split_keeps_it_whole_in_file_order():
    # The embedded default: 100 validation rows, eval.max_val_examples=100 -> the same rows in the
    # same order as before sampling existed, so its validation scores do not move.
    assert eval_sample(rows(100), 100) == rows(100)
    assert eval_sample(rows(100), 0) == rows(100)
    assert eval_sample(rows(7), 1000) == rows(7)


def test_a_limit_draws_a_fixed_random_sample_in_file_order():
    # 100 of 10,000 rows (think: a dev split sorted by speaker). The first 100 rows would be one
    # stretch of the file; a uniform sample's largest index is below 9,000 with probability
    # 0.9^100 < 3e-5, and its indices spread over all ten tenths of the file.
    picked = eval_sample(rows(10_000), 100)
    index = [int(r["id"].split("-")[1]) for r in picked]
    assert len(index) == 100 and len(set(index)) == 100
    assert index == sorted(index)  # file order among the chosen rows
    assert index != list(range(100)) and max(index) >= 9_000
    assert len({i // 1_000 for i in index}) == 10
    assert eval_sample(rows(10_000), 100) == picked  # the same rows on every call and every seed


def test_caption_names_the_rows_left_out():
    cfg = load_config(None, ["eval.max_test_examples=5"])
    assert _left_out(0, cfg) == ""
    assert _left_out(195, cfg) == (", 195 more left out by eval.max_test_examples=5: not the "
                                   "whole test set")
