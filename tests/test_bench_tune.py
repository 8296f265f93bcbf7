"""bench/tune.py without a model: variant words, cut numbers, the table's ratios."""

from __future__ import annotations

from dynkv_bench.tune import parse_variant, table, truncated


def test_variant_words_become_settings():
    assert parse_variant("floor=r_min:0.2,span:digits,kernel:5") == (
        "floor",
        {"r_min": 0.2, "span": "digits", "kernel": 5},
    )
    assert parse_variant("base=") == ("base", {})


def test_a_number_answered_in_part_is_truncated_and_a_whole_one_is_not():
    assert truncated("The pass key is 45032.", "The pass key is 4503.")
    assert not truncated("The pass key is 45032.", "The pass key is 45032.")
    assert not truncated("The pass key is 45032.", "I do not know.")


def test_percent_of_full_compares_a_cell_with_full_kv_on_its_own_examples():
    rows = [
        dict(task="a", index=0, method="full", budget="full", variant="-", score=1.0),
        dict(task="b", index=0, method="full", budget="full", variant="-", score=0.0),
        dict(task="a", index=0, method="snapkv", budget="5%", variant="x", score=1.0, gap=0.1, agree=0.9,
             truncated=False),
    ]  # fmt: skip
    line = [l for l in table(rows).splitlines() if "| snapkv |" in l][0]
    assert "| 100.0 | 100 |" in line  # one example, solved by full KV and by the cell: 100%, not 200%
