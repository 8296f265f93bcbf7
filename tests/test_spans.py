"""Spans: a number's digits (or a word's pieces) are ranked as one piece."""

from __future__ import annotations

import pytest
import torch

from dynkv_cli.errors import UsageError
from dynkv_cli.methods import parse_method
from dynkv_cli.spans import candidate_spans, span_max, span_starts


class Pieces:
    """A tokenizer stand-in: ids index a list of byte-level BPE pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


TOK = Pieces(["ĠThe", "Ġkey", "Ġis", "Ġ", "6", "7", "2", ".", "Ġunbelie", "vable", "9"])


def test_digit_runs_and_word_pieces_start_spans_where_expected():
    ids = list(range(11))
    assert span_starts(TOK, ids, "digits") == [True, True, True, True, True, False, False, True, True, True, True]
    word = span_starts(TOK, ids, "word")
    assert word[9] is False  # "vable" continues "Ġunbelie"
    assert word[10] is False  # "9" after "vable": letters and digits of one word
    assert span_starts(TOK, ids, "none") == [True] * 11


def test_span_max_raises_every_member_to_the_span_best():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.1, 0.7]])
    spans = torch.tensor([0, 1, 1, 2])
    want = torch.tensor([[0.1, 0.9, 0.9, 0.3], [0.5, 0.1, 0.1, 0.7]])
    assert torch.allclose(span_max(scores, spans), want)


def test_kept_neighbours_with_one_stored_score_stay_one_span():
    positions = torch.tensor([[3, 4, 5, 9, 20, 21]])
    previous = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0, 0.0]])  # 3-5 were one span; 9 is not adjacent
    spans = candidate_spans(positions, previous, torch.tensor([True, False]))
    assert spans.tolist() == [[0, 0, 0, 1, 2, 2]]
    assert candidate_spans(positions, previous, None) is None


def test_span_and_probe_window_are_method_settings():
    spec = parse_method("snapkv", {"span": "digits", "probe_window": 8})
    assert spec.settings[0].span == "digits" and spec.settings[0].probe_window == 8
    with pytest.raises(UsageError, match="span"):
        parse_method("dynamickv", {"span": "sentences"})
    with pytest.raises(UsageError, match="probe_window"):
        parse_method("dynamickv", {"probe_window": -1})
