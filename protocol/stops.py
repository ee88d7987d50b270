"""Stop sequences in streamed text: where generated text is cut, and how much of its end to hold back while streaming.

One rule for every generation that streams text (the daemon's `/v1/generate` and OpenAI endpoints, and `petalctl
generate --adapter`, which samples on the client): text is cut before the first stop sequence, and a streamed piece
never has to be taken back, because the end of the text is held back while it could still be the start of a stop
sequence or an incomplete UTF-8 character. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["find_stop", "held_back"]


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop sequence in ``text`` starts (cut the text there), or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to keep back: an incomplete character, or a possible start of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep
