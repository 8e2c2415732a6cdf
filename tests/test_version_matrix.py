"""tests/version_matrix.py's comparison: what a release must reproduce, and how a difference is reported."""

import torch

import version_matrix
from parity_probe import SAMPLER


def record(sampler, sample, greedy):
    return {SAMPLER: sampler, "v2/sample": sample, "v2/greedy": greedy, "v2/logits": torch.zeros(1, 3)}


def test_sampled_tokens_count_only_where_torch_draws_alike():
    reference = record([5, 7], [[1, 2, 3]], [[1, 4]])
    assert version_matrix.compare(reference, record([5, 7], [[1, 2, 3]], [[1, 4]])) == []
    assert version_matrix.compare(reference, record([5, 7], [[1, 2, 9]], [[1, 4]])) != []
    other_torch = record([6, 2], [[1, 2, 9]], [[1, 4]])
    assert version_matrix.compare(reference, other_torch) == []  # sampled tokens not comparable
    assert version_matrix.compare(reference, record([6, 2], [[1, 2, 9]], [[1, 5]])) != []  # greedy still is


def test_a_difference_is_shown_from_where_it_starts_and_logits_by_their_largest_gap():
    reference = record([5], [[1]], [list(range(100))])
    got = record([5], [[1]], [list(range(60)) + [0] * 40])
    got["v2/logits"] = torch.full((1, 3), 2e-5)
    problems = version_matrix.compare(reference, got)
    assert problems[0].startswith("v2/greedy: from character") and "59, 0, 0" in problems[0]
    assert problems[1] == "v2/logits: max |diff| 2.00e-05"
