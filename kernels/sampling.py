"""Choosing the next token from logits, and the log-probabilities reported with it (pure, no I/O).

Transforms: OpenAI's ``logit_bias`` and presence/frequency penalties first (added to the logits, as OpenAI defines
them), then transformers' order (repetition penalty, temperature, top-k, top-p), so that a given seed and settings
mean the same thing here as there; greedy output without bias or penalties is identical to ``generate``'s.
Reported log-probabilities are those of the model itself (``log_softmax`` of the raw logits, before any transform),
so they can be compared with the model's and used to score text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "LOGIT_BIAS_RANGE",
    "PENALTY_RANGE",
    "SamplingParams",
    "TokenLogprob",
    "apply_logit_bias",
    "apply_penalties",
    "apply_repetition_penalty",
    "make_generator",
    "prompt_logprobs",
    "sample_next",
    "token_logprob",
]

PENALTY_RANGE = (-2.0, 2.0)
"""OpenAI's range for ``presence_penalty`` and ``frequency_penalty``."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""OpenAI's range for each ``logit_bias`` value (-100 bans a token, +100 all but forces it)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy (top-k/top-p are then ignored)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in the prompt or output
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per earlier occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the bad field; every public entry point calls this before generating."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}], got {value!r}")
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
                raise ValueError(
                    f"logit_bias values must be in [{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}], "
                    f"got {bias!r} for token {token}"
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded runs repeat exactly; unseeded ones draw a fresh seed."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: positive logits of seen tokens are divided, negative ones multiplied."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
    picked = logits[idx]
    out = logits.clone()
    out[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """OpenAI's ``logit_bias``: each value is added to its token's logit before sampling (ids past the vocab are an
    error: callers check them against the model's vocab first)."""
    if not bias:
        return logits
    out = logits.clone()
    for token, value in bias:
        out[token] += value
    return out


def apply_penalties(logits: torch.Tensor, generated: Sequence[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] -= c[j] * frequency + (c[j] > 0) * presence``, where ``c[j]`` counts token
    ``j`` among the tokens generated so far (not the prompt)."""
    if (presence == 0 and frequency == 0) or not generated:
        return logits
    counts = Counter(int(t) for t in generated)
    idx = torch.tensor(list(counts), dtype=torch.long)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype)
    out = logits.clone()
    out[idx] -= c * frequency + presence
    return out


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: Sequence[int] = (),
    generator: torch.Generator | None = None,
    generated: Sequence[int] = (),
) -> int:
    """The next token id from ``logits`` ``[vocab]`` of the last position; ``seen`` = prompt + generated ids (for
    the repetition penalty), ``generated`` = the generated ids alone (for the presence and frequency penalties)."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be [vocab], got {tuple(logits.shape)}")
    scores = apply_logit_bias(logits.float(), params.logit_bias)
    scores = apply_penalties(scores, generated, params.presence_penalty, params.frequency_penalty)
    scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        return int(scores.argmax())
    scores = scores / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``top`` most likely tokens at its position (best first)."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top: int = 0) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` ``[vocab]`` (the raw ones, before sampling transforms)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.numel())) if top > 0 else None
    pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(int(token), float(logp[token]), pairs)


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Log-probability of each ``ids[i + 1]`` given ``ids[: i + 1]``, from ``logits`` ``[n, vocab]`` of positions
    ``0 .. n - 1`` (``n <= len(ids) - 1``): what scoring a text (an evaluation harness's ``echo``) needs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([int(i) for i in ids[1 : logp.shape[0] + 1]], dtype=torch.long)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    if top > 0:
        best = torch.topk(logp, min(top, logp.shape[1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)]
    else:
        tops = [() for _ in chosen]
    return [TokenLogprob(int(t), float(lp), tp) for t, lp, tp in zip(targets.tolist(), chosen, tops, strict=True)]
