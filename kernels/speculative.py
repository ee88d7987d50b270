"""Speculative decoding without a draft model: prompt lookup guesses the next tokens from the context itself.

A guess of k tokens is checked by one inference step of k + 1 tokens (the last picked token and the guesses): the
head's pick after each position says how many guesses decoding would have made itself; the rest are rolled back
(the next step is sent at their position, and the servers truncate their caches there). Used by the daemon's
``/v1/generate`` (``speculative``) and by ``RemoteModelForCausalLM.generate(prompt_lookup_num_tokens=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["MAX_NGRAM", "MIN_NGRAM", "DraftLength", "check_guesses", "lookup_draft"]

MAX_NGRAM = 3
"""Longest context suffix `lookup_draft` looks for earlier in the context."""
MIN_NGRAM = 2
"""Shortest: a single repeated token predicts too little (guesses that are checked and thrown away cost compute)."""


def lookup_draft(context: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Prompt lookup: up to ``k`` tokens that followed the latest earlier occurrence of the context's last n-gram
    (the longest ``min_ngram`` <= n <= ``max_ngram`` that occurs), or none. Repetitive text (code, quoting the
    prompt, lists) continues as before often enough that checking the guess in the same step pays off."""
    if k <= 0:
        return []
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        tail = list(context[n_ctx - n :])
        for start in range(n_ctx - n - 1, -1, -1):  # latest first; the suffix itself is excluded
            if list(context[start : start + n]) == tail:
                return list(context[start + n : start + n + k])
    return []


def check_guesses(guesses: Sequence[int], pick: Callable[[int, list[int]], int]) -> list[int]:
    """The tokens one verifying step yields: ``pick(i, picked)`` is decoding's choice after input position ``i``
    (the step's last picked token is position 0, guess ``j`` is position ``j + 1``) given the tokens picked so far.
    Guesses are kept while they equal the pick; the first pick that differs, or the one after the last guess, ends
    the list. So it holds the kept guesses and one more token, all exactly what plain decoding would produce."""
    picked: list[int] = []
    for i in range(len(guesses) + 1):
        picked.append(pick(i, picked))
        if i == len(guesses) or picked[-1] != guesses[i]:
            break
    return picked


class DraftLength:
    """How many tokens to guess next, adapted as transformers' assisted generation does: +2 after a step whose guesses
    were all kept, -1 (at least 1) after one that lost some, never more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = self.now = limit

    def update(self, guessed: int, kept: int) -> None:
        if guessed:
            self.now = min(self.limit, self.now + 2) if kept == guessed else max(1, self.now - 1)
