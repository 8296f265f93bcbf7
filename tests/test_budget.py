import pytest

from dynkv_cli.budget import Budget, parse_budget
from dynkv_cli.errors import BudgetError


@pytest.mark.parametrize(
    "word,kind,value",
    [
        ("1.7%", "percent", 1.7),
        ("0.9 %", "percent", 0.9),
        ("128", "tokens", 128),
        (64, "tokens", 64),
        ("512MiB", "bytes", 512 * 2**20),
        ("2GB", "bytes", 2e9),
        ("1.5gib", "bytes", 1.5 * 2**30),
        ("full", "full", 0),
        ("100%", "full", 0),
    ],
)
def test_parse(word, kind, value):
    b = parse_budget(word)
    assert b.kind == kind and b.value == pytest.approx(value)


@pytest.mark.parametrize("word", ["", "abc", "1.7", "-3", "0", "0%", "150%", "12 apples", "5TB", True])
def test_bad_words_say_what_to_write(word):
    with pytest.raises(BudgetError, match="1.7%"):
        parse_budget(word)


def test_resolve():
    assert parse_budget("1.7%").resolve(7400) == 126  # ceil(125.8)
    assert parse_budget("128").resolve(100) is None  # at or above the document: no compression
    assert parse_budget("128").resolve(None) == 128
    assert parse_budget("1MiB").resolve(10_000, bytes_per_token=1024) == 1024
    assert Budget("full", 0).resolve(10) is None
    with pytest.raises(BudgetError):
        parse_budget("1.7%").resolve(None)
    with pytest.raises(BudgetError, match="smaller than one token"):
        parse_budget("10B").resolve(1000, bytes_per_token=1024)
