"""The model frontend: text in, tokens out, with the transformer blocks run by the swarm.

The client side of a model (tokenizer, chat template, embeddings, final norm and head) stays on this machine,
as in Petals: only hidden states cross the network. ``generate`` prefills the prompt once through an
``InferenceSession`` and then runs one step per new token, so the servers keep the KV cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from petal.daemon.hub import client_missing
from petal.daemon.pull import default_models_dir
from petal.daemon.routing import calls
from petal.daemon.routing.router import Router
from petal.daemon.routing.session import InferenceSession
from petal.kernels.beams import BeamSearch
from petal.kernels.sampling import (
    SamplingParams,
    TokenLogprob,
    make_generator,
    prompt_logprobs,
    sample_next,
    token_logprob,
)
from petal.kernels.speculative import DraftLength, check_guesses, lookup_draft
from petal.kernels.store import ModelStoreError, load_client_parts, open_model
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MODEL_HINT
from petal.protocol.stops import find_stop as _find_stop
from petal.protocol.stops import held_back as _held_back

log = logging.getLogger("petal.frontend")


MAX_NAME_BYTES = 255
"""Longest model name, or path component of a model dir, in UTF-8 bytes (what file systems allow)."""
MAX_PATH_BYTES = 4096
HEAD_CHUNK = 256
"""Positions whose logits are computed at once when every position needs them (``vocab x HEAD_CHUNK`` floats)."""
FORWARD_TOKENS = 8192
"""Most tokens (rows x padded length) sent through the swarm in one forward by ``final_hidden``."""


def _check_model_name(name: str) -> None:
    """Refuse, as a 400 naming the problem, model names no file system could hold."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise PetalError("bad_request", f"model name {name[:60]!r} is not valid Unicode") from None
    if not name or "\0" in name:
        raise PetalError("bad_request", f"model name {name[:60]!r} is empty or holds a NUL byte")
    if len(encoded) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_NAME_BYTES for part in name.split("/")):
        raise PetalError(
            "bad_request",
            f"model name {name[:60]!r}... is {len(encoded)} bytes: a name (and each part of a model dir's path) may "
            f"have at most {MAX_NAME_BYTES} bytes; use `petalctl models` to see the names of the swarm's models",
        )


def _is_model_dir(path: Path) -> bool:
    try:
        return (path / "config.json").is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long, a loop, ...): not a model dir
        return False


def resolve_model(name: str, models_dir: Path | None = None) -> Path:
    """``name`` is a model dir, or a model pulled into the models dir; raises PetalError("not_found") otherwise.

    A name with a ``/`` may be a model dir's path (``~`` is expanded); otherwise it must be a plain name inside
    the models dir (no ``.``, ``..`` or empty parts). Names no file system could hold are a 400.
    """
    if not isinstance(name, str):
        raise PetalError("bad_request", MODEL_HINT)
    _check_model_name(name)
    if "/" in name:
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # ~user of no such user, or no home dir
            path = Path(name)
        if _is_model_dir(path):
            return path
    root = models_dir or default_models_dir()
    parts = name.split("/")
    if all(part not in ("", ".", "..") for part in parts) and _is_model_dir(root / name):
        return root / name
    shown = name if len(name) <= 80 else name[:80] + "..."
    raise PetalError(
        "not_found",
        f"model {shown!r} is not in the local models dir {root}: the client side (tokenizer, embeddings, head) "
        f"runs here, so pull it first with `petalctl models pull {shown}` (or `petald pull {shown}`)",
    )


@dataclass
class Token:
    """One generated token: its id and the text it adds to the answer (may be "" while a character is incomplete)."""

    id: int | None  # None for a final flush of held-back text
    text: str


@dataclass
class Generation:
    """What a finished ``generate`` produced; filled in as it runs."""

    prompt_tokens: int = 0
    tokens: list[int] | None = None
    text: str = ""
    finish_reason: str = "length"  # "length" | "stop" (end-of-sequence token or stop sequence)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in ``tokens``, with logprobs=k
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt positions 1.., with prompt_logprobs=k
    steps: int = 0  # swarm round trips (counted by generate_speculative)
    drafted: int = 0  # speculative decoding: tokens guessed, and how many of them were kept
    accepted: int = 0


class ModelFrontend:
    """Tokenizer + chat template + local ClientParts for one model dir."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        if client_missing(Path(model_dir)):  # a server's partial pull: its embeddings and head were never fetched
            repo = f"{Path(model_dir).parent.name}/{Path(model_dir).name}"
            raise PetalError(
                "not_found",
                f"{model_dir} holds only served blocks; fetch the client parts with `petald pull {repo} --client-only`",
            )
        try:
            self.info = open_model(model_dir)
            self.parts = load_client_parts(self.info, dtype=dtype)
        except ModelStoreError as e:
            raise PetalError("not_found", str(e)) from None
        self.name = self.info.name
        self.dtype = dtype
        self.tokenizer: Any = None
        if (self.info.path / "tokenizer.json").is_file() or (self.info.path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.info.path)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a broken tokenizer file
                raise PetalError(
                    "not_found",
                    f"the tokenizer in {self.info.path} cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                    "pull the model again",
                ) from None
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.info.path).eos_token_id
        except (OSError, ValueError):
            eos = getattr(self.info.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise PetalError("bad_request", f"model {self.name!r} has no tokenizer in {self.info.path}; send input_ids")
        return self.tokenizer

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt``; with ``chat`` it becomes one user message through the model's chat template."""
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return list(self._need_tokenizer()(prompt)["input_ids"])

    def encode_messages(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}, ...]``) with the generation prompt appended."""
        tok = self._need_tokenizer()
        if not tok.chat_template:
            raise PetalError("bad_request", f"model {self.name!r} has no chat template; use a plain prompt")
        out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    async def generate(
        self,
        router: Router,
        input_ids: Sequence[int],
        params: SamplingParams,
        result: Generation | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        **session_kwargs: Any,
    ) -> AsyncGenerator[Token, None]:
        """Yield new tokens as they are sampled; ``result`` (if given) holds the totals at the end.

        With ``logprobs=k``, ``result.logprobs`` gets each token's log-probability under the model and the k
        likeliest tokens (appended before the token is yielded); with ``prompt_logprobs=k`` the prefill also scores
        every prompt token (``result.prompt_logprobs``), which costs the head over all prompt positions, so only
        when asked.

        Stops after ``max_new_tokens``, at an end-of-sequence token (not yielded), or when the text reaches a stop
        sequence (the text is cut before it). Text is held back while it could still be the start of a stop
        sequence or an incomplete UTF-8 character, so streamed text never has to be taken back.
        """
        params.validate()
        ids = [int(i) for i in input_ids]
        vocab = int(self.info.config.vocab_size)
        if not ids:
            raise PetalError("bad_request", "the prompt is empty")
        if any(not 0 <= i < vocab for i in ids):
            raise PetalError("bad_request", f"input_ids must be in [0, {vocab})")
        result = result if result is not None else Generation()
        result.prompt_tokens, result.tokens, result.text = len(ids), [], ""
        generator = make_generator(params.seed)
        generated: list[int] = []
        shown = ""
        session = InferenceSession(router, self.name, max_length=len(ids) + params.max_new_tokens, **session_kwargs)
        async with session:
            await self._check_fingerprint(router)
            x = torch.tensor([ids])
            for _ in range(params.max_new_tokens):
                # grad mode is per thread, not per task: a no_grad block must not span an await, or concurrent
                # generations on this loop restore each other's modes out of order and leave autograd off
                with torch.no_grad():
                    embedded = self.parts.embed(x).to(self.dtype)
                hidden = await session.step(embedded)
                if prompt_logprobs is not None and result.prompt_logprobs is None:
                    result.prompt_logprobs = await asyncio.to_thread(
                        self.score_hidden, hidden[0, :-1], ids, prompt_logprobs
                    )
                with torch.no_grad():
                    logits = self.parts.logits(hidden[:, -1:].float())[0, -1]
                token = sample_next(logits, params, ids + generated, generator, generated=generated)
                scored = None if logprobs is None else token_logprob(logits, token, logprobs)
                if token in self.eos_token_ids:
                    result.finish_reason = "stop"
                    break
                generated.append(token)
                result.tokens = list(generated)
                if scored is not None:
                    result.logprobs.append(scored)
                text = self.decode(generated)
                cut = _find_stop(text, params.stop)
                if cut is not None:
                    result.text = text[:cut]
                    result.finish_reason = "stop"
                    if len(result.text) > len(shown):
                        yield Token(token, result.text[len(shown) :])
                    return
                safe = len(text) - _held_back(text, params.stop)
                piece = text[len(shown) : safe] if safe > len(shown) else ""
                shown += piece
                result.text = text
                yield Token(token, piece)
                x = torch.tensor([[token]])
        if len(result.text) > len(shown):  # whatever was held back, now that no stop sequence can follow
            yield Token(None, result.text[len(shown) :])

    def score_hidden(self, hidden: torch.Tensor, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Log-probabilities of ``ids[1:]`` from the final hidden states ``[n, H]`` of positions ``0..n-1`` (the head
        runs over ``HEAD_CHUNK`` positions at a time, so a long prompt never holds ``vocab x n`` logits at once).
        Blocking: call it in a thread."""
        out: list[TokenLogprob] = []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], HEAD_CHUNK):
                logits = self.parts.logits(hidden[None, start : start + HEAD_CHUNK].float())[0]
                out += prompt_logprobs(logits, ids[start:], top)
        return out

    async def final_hidden(
        self, router: Router, prompts: Sequence[Sequence[int]], codec: str | None = None, adapter: str | None = None
    ) -> list[torch.Tensor]:
        """Each prompt's hidden states ``[len, H]`` after the last block (before the final norm), by plain forwards
        through the swarm (no KV cache). Prompts are right-padded into batches of at most ``FORWARD_TOKENS``
        tokens: with causal attention a real position never sees the padding after it, so padding changes nothing.
        """
        vocab = int(self.info.config.vocab_size)
        for ids in prompts:
            if not ids:
                raise PetalError("bad_request", "a prompt is empty")
            if any(not 0 <= i < vocab for i in ids):
                raise PetalError("bad_request", f"token ids must be in [0, {vocab})")
        await self._check_fingerprint(router)
        out: list[torch.Tensor] = []
        batch: list[Sequence[int]] = []

        async def flush() -> None:
            width = max(len(ids) for ids in batch)
            x = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids in batch])
            with torch.no_grad():
                embedded = self.parts.embed(x).to(self.dtype)
            hidden = await calls.forward(router, self.name, embedded, codec=codec, adapter=adapter)
            out.extend(hidden[row, : len(ids)].float() for row, ids in enumerate(batch))
            batch.clear()

        for ids in prompts:
            width = max([len(ids), *(len(b) for b in batch)])
            if batch and width * (len(batch) + 1) > FORWARD_TOKENS:
                await flush()
            batch.append(ids)
        if batch:
            await flush()
        return out

    async def generate_beams(
        self,
        router: Router,
        input_ids: Sequence[int],
        params: SamplingParams,
        num_beams: int,
        result: Generation | None = None,
        **session_kwargs: Any,
    ) -> AsyncGenerator[Token, None]:
        """Beam search (greedy, transformers' rules: ``petal.kernels.beams``) over one session of ``num_beams`` rows
        whose cache rows the servers reorder between steps; yields the best sequence's text once it is known (at the
        end), cut before a stop sequence. ``result`` as for ``generate``."""
        ids = self._check_ids(input_ids)
        result = result if result is not None else Generation()
        result.prompt_tokens, result.tokens, result.text = len(ids), [], ""
        search = BeamSearch(num_beams, params.max_new_tokens, self.eos_token_ids)
        session = InferenceSession(
            router, self.name, max_length=len(ids) + params.max_new_tokens, batch=num_beams, **session_kwargs
        )
        async with session:
            await self._check_fingerprint(router)
            x = torch.tensor([ids] * num_beams)
            reorder: list[int] | None = None
            while True:
                with torch.no_grad():
                    embedded = self.parts.embed(x).to(self.dtype)
                hidden = await session.step(embedded, None, reorder)
                with torch.no_grad():
                    logits = self.parts.logits(hidden[:, -1:].float())[:, -1]
                reorder, tokens = search.step(logits)
                if search.done:
                    break
                x = torch.tensor(tokens)[:, None]
        generated = search.best
        if generated and generated[-1] in self.eos_token_ids:
            generated = generated[:-1]
            result.finish_reason = "stop"
        text = self.decode(generated)
        cut = _find_stop(text, params.stop)
        if cut is not None:
            text, result.finish_reason = text[:cut], "stop"
        result.tokens, result.text = generated, text
        for i, token in enumerate(generated):  # one line per token, the whole text with the last one
            yield Token(token, text if i == len(generated) - 1 else "")

    async def generate_speculative(
        self,
        router: Router,
        input_ids: Sequence[int],
        params: SamplingParams,
        draft: int,
        result: Generation | None = None,
        **session_kwargs: Any,
    ) -> AsyncGenerator[Token, None]:
        """``generate`` for deterministic sampling (temperature 0) with speculative decoding: each step sends the
        last token plus up to ``draft`` tokens guessed by prompt lookup (``lookup_draft``: what followed the latest
        earlier occurrence of the context's last n-gram); the servers run them as one step and the head checks
        them all, keeping the guesses up to the first that differs from what decoding would pick, plus that pick.
        Rejected positions are rolled back (the next step is sent at the first of them; servers truncate their
        caches). The guess length adapts as transformers' assisted generation does: +2 after a step whose guesses
        were all kept, -1 (at least 1) otherwise, at most ``draft``. The tokens are the ones plain decoding picks;
        ``result.steps``/``drafted``/``accepted`` count the swarm round trips and the guesses."""
        params.validate()
        if params.temperature > 0:
            raise PetalError("bad_request", "speculative decoding needs temperature 0 (greedy); leave one out")
        ids = self._check_ids(input_ids)
        result = result if result is not None else Generation()
        result.prompt_tokens, result.tokens, result.text = len(ids), [], ""
        result.steps = result.drafted = result.accepted = 0
        generator = make_generator(params.seed)
        generated: list[int] = []
        shown = ""
        budget = len(ids) + params.max_new_tokens + draft
        session = InferenceSession(router, self.name, max_length=budget, **session_kwargs)
        async with session:
            await self._check_fingerprint(router)
            x, k = ids, DraftLength(draft)
            guesses: list[int] = []
            while True:
                with torch.no_grad():
                    embedded = self.parts.embed(torch.tensor([x])).to(self.dtype)
                start = session.position
                hidden = await session.step(embedded)
                result.steps += 1
                with torch.no_grad():  # the last position of the input and every guess
                    logits = self.parts.logits(hidden[:, -1 - len(guesses) :].float())[0]

                def pick(i: int, got: list[int], rows: torch.Tensor = logits) -> int:
                    return sample_next(rows[i], params, ids + generated + got, generator, generated=generated + got)

                picked = check_guesses(guesses, pick)
                result.drafted += len(guesses)
                result.accepted += len(picked) - 1
                k.update(len(guesses), len(picked) - 1)
                if len(picked) - 1 < len(guesses):  # forget the rejected guesses' positions
                    await session.rollback(start + len(x) - len(guesses) + len(picked) - 1)
                for token in picked:
                    if token in self.eos_token_ids:
                        result.finish_reason = "stop"
                        break
                    generated.append(token)
                    result.tokens = list(generated)
                    text = self.decode(generated)
                    cut = _find_stop(text, params.stop)
                    if cut is not None:
                        result.text, result.finish_reason = text[:cut], "stop"
                        if len(result.text) > len(shown):
                            yield Token(token, result.text[len(shown) :])
                        return
                    safe = len(text) - _held_back(text, params.stop)
                    piece = text[len(shown) : safe] if safe > len(shown) else ""
                    shown += piece
                    result.text = text
                    yield Token(token, piece)
                    if len(generated) == params.max_new_tokens:
                        break
                if result.finish_reason == "stop" or len(generated) == params.max_new_tokens:
                    break
                left = params.max_new_tokens - len(generated) - 1  # the step's own pick comes on top of guesses
                guesses = lookup_draft(ids + generated, min(k.now, left))
                x = [generated[-1], *guesses]
        if len(result.text) > len(shown):  # whatever was held back, now that no stop sequence can follow
            yield Token(None, result.text[len(shown) :])

    def _check_ids(self, input_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in input_ids]
        vocab = int(self.info.config.vocab_size)
        if not ids:
            raise PetalError("bad_request", "the prompt is empty")
        if any(not 0 <= i < vocab for i in ids):
            raise PetalError("bad_request", f"input_ids must be in [0, {vocab})")
        return ids

    async def _check_fingerprint(self, router: Router) -> None:
        view = await router.view(self.name)
        if view.fingerprint and view.fingerprint != self.info.fingerprint:
            raise PetalError(
                "conflict",
                f"the swarm serves {self.name!r} with fingerprint {view.fingerprint} but the local copy is "
                f"{self.info.fingerprint}: pull the same version the servers run",
            )
