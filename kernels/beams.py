"""Beam search as a step function over an inference session whose batch rows are the beams.

transformers' beam search keeps a KV cache per beam and gathers the cache rows after every step; over the swarm the
servers hold the cache, so a session of ``num_beams`` rows does the same with a ``reorder`` on each step (the
servers gather their cache rows, see ``petal.kernels.cache.KVCache.reorder``). ``BeamSearch`` is the bookkeeping
between steps, no I/O: feed it each step's last-position logits, it answers which rows to keep (the next step's
``reorder``) and which token each row appends.

It follows transformers' ``GenerationMixin._beam_search`` (5.x, one prompt, ``do_sample=False``, no logits
processors) step for step: the top ``max(2, 1 + len(eos)) * num_beams`` continuations of all beams by summed log
probability; continuations ending in an end-of-sequence token, or reaching ``max_length``, are finished with score
``sum / generated_length ** length_penalty`` and kept if among the ``num_beams`` best finished; the best
``num_beams`` unfinished continue. Stopping is transformers' too: ``early_stopping`` True (stop once ``num_beams``
are finished), False (its heuristic: stop when the best running beam, scored at the current length, cannot beat the
worst finished one) or "never" (with a positive length penalty, scored at ``max_length``). The result is the best
finished sequence, its end-of-sequence token included, as transformers returns it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

__all__ = ["BeamSearch"]

_NEG = -1.0e9  # transformers' stand-in for "impossible"


@dataclass
class BeamSearch:
    """One prompt's beam search; see the module docstring. ``max_new_tokens`` bounds the generated length."""

    num_beams: int
    max_new_tokens: int
    eos: Iterable[int] = ()
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    running: list[list[int]] = field(init=False)  # the running beams' generated tokens
    running_scores: torch.Tensor = field(init=False)
    finished: list[list[int]] = field(init=False)  # the best finished sequences, best first
    finished_scores: torch.Tensor = field(init=False)
    finished_real: torch.Tensor = field(init=False)  # which finished slots hold a real sequence
    steps: int = 0
    done: bool = False
    _eos: frozenset[int] = field(init=False, default=frozenset())
    _improvable: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"num_beams and max_new_tokens must be positive, got {self.num_beams}, {self.max_new_tokens}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self._eos = frozenset(int(e) for e in self.eos)
        k = self.num_beams
        self.running = [[] for _ in range(k)]
        self.running_scores = torch.full((k,), _NEG)
        self.running_scores[0] = 0.0  # all beams start equal: only the first may expand at the first step
        self.finished = [[] for _ in range(k)]
        self.finished_scores = torch.full((k,), _NEG)
        self.finished_real = torch.zeros(k, dtype=torch.bool)

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Take the last-position logits of every running beam ``[num_beams, vocab]``; return ``(reorder, tokens)``:
        the next step's rows are copies of rows ``reorder`` with ``tokens`` appended (feed ``tokens`` next, with
        ``reorder``). Sets ``done`` when the search is over (then the step's result is final, nothing to feed)."""
        if self.done:
            raise RuntimeError("this beam search is over; read `best`")
        k = self.num_beams
        log_probs = F.log_softmax(logits.float(), dim=-1) + self.running_scores[:, None]
        vocab = log_probs.shape[-1]
        keep = max(2, 1 + len(self._eos)) * k
        top_scores, top_index = torch.topk(log_probs.reshape(-1), keep)
        sources = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        generated = self.steps + 1
        hits = torch.tensor(
            [t in self._eos or generated >= self.max_new_tokens for t in tokens],
            dtype=torch.bool,
        )
        candidates = [self.running[s] + [t] for s, t in zip(sources, tokens, strict=True)]

        # the best num_beams unfinished continuations run on
        running_scores = top_scores + hits.float() * _NEG
        order = torch.topk(running_scores, k).indices.tolist()
        reorder = [sources[i] for i in order]
        next_tokens = [tokens[i] for i in order]
        self.running = [candidates[i] for i in order]
        self.running_scores = running_scores[order]

        # finished continuations among the first num_beams candidates join the finished list if good enough
        finished_now = hits & (torch.arange(keep) < k)
        scores = top_scores / (generated**self.length_penalty)
        if self.early_stopping is True and bool(self.finished_real.all()):
            scores = scores + _NEG
        if not self._improvable:
            scores = scores + _NEG
        scores = scores + (~finished_now).float() * _NEG
        merged_scores = torch.cat([self.finished_scores, scores])
        merged = self.finished + candidates
        merged_real = torch.cat([self.finished_real, finished_now])
        best = torch.topk(merged_scores, k).indices.tolist()
        self.finished = [merged[i] for i in best]
        self.finished_scores = merged_scores[best]
        self.finished_real = merged_real[best]

        self.steps = generated
        self._improvable = self._improvable and self._may_improve()
        stop_all = self.early_stopping is True and bool(self.finished_real.all())
        self.done = not self._improvable or stop_all or bool(hits.all())
        return reorder, next_tokens

    def _may_improve(self) -> bool:
        """transformers' ``_check_early_stop_heuristic`` for one prompt."""
        length = self.steps
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        best_running = float(self.running_scores[0]) / (length**self.length_penalty)
        worst = float(self.finished_scores.min())
        return any(best_running > (worst if real else _NEG) for real in self.finished_real.tolist())

    @property
    def best(self) -> list[int]:
        """The generated tokens of the best finished sequence (end-of-sequence token included, as transformers)."""
        return list(self.finished[0])
