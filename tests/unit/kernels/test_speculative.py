"""Prompt lookup for speculative decoding: what follows the latest earlier occurrence of the context's last n-gram."""

from __future__ import annotations

from petal.kernels.speculative import DraftLength, check_guesses, lookup_draft


def test_longest_then_latest_match_and_nothing_to_find():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], 3) == [
        7,
        8,
        5,
    ]  # 2-gram (2, 3): the latest, not the first
    assert lookup_draft([1, 2, 3, 4, 5, 6, 7, 9, 9, 1, 2, 3], 2) == [4, 5]  # 3-gram wins
    assert lookup_draft([4, 5, 6, 4, 5], 8) == [6, 4, 5]  # runs up to the context's end
    assert lookup_draft([1, 2, 3, 4, 5, 3], 4) == []  # a single repeated token is not enough
    assert lookup_draft([1, 2, 1, 2], 0) == [] and lookup_draft([], 4) == [] and lookup_draft([7], 4) == []


def test_draft_length_grows_after_full_hits_and_shrinks_after_misses():
    k = DraftLength(6)
    k.update(6, 2)
    assert k.now == 5
    for _ in range(6):
        k.update(k.now, 0)
    assert k.now == 1  # never below one guess
    k.update(1, 1)
    k.update(3, 3)
    assert k.now == 5
    k.update(0, 0)  # a step without guesses changes nothing
    k.update(5, 5)
    assert k.now == 6  # never above the limit


def test_check_guesses_keeps_matching_guesses_and_one_pick_more():
    choices = [5, 6, 9, 1]  # decoding's pick after each position of the verifying step
    seen: list[list[int]] = []

    def pick(i: int, got: list[int]) -> int:
        seen.append(list(got))
        return choices[i]

    assert check_guesses([5, 6, 7], pick) == [5, 6, 9]  # the third guess differs: decoding's own pick replaces it
    assert seen == [[], [5], [5, 6]]  # each pick sees the tokens picked before it (for penalties)
    assert check_guesses([5, 6, 9], lambda i, got: choices[i]) == [5, 6, 9, 1]  # all kept, plus the bonus token
    assert check_guesses([], lambda i, got: choices[i]) == [5]  # no guesses: a plain decoding step
