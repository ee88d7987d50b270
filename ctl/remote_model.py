"""A torch model whose transformer blocks run in the swarm: train soft prompts, LoRA or local heads through it.

The client side of the model (embeddings, final norm, head) is loaded here from the local model dir, as in
Petals; the blocks run through the local daemon (`Client.forward/backward`, the socket's tensor endpoints).
`RemoteBlocks` is the autograd bridge: its forward is one remote forward, its backward one remote backward,
which returns gradients for the input hidden states, the deep prompts and the LoRA weights sent along. The
servers never update their own weights, so many clients can train different things on the same servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from petal.kernels.beams import BeamSearch
from petal.kernels.families.base import ClientPartsBase
from petal.kernels.sampling import SamplingParams, make_generator, sample_next
from petal.kernels.speculative import DraftLength, check_guesses, lookup_draft
from petal.kernels.store import ModelInfo, load_client_parts, open_model
from petal.protocol.lora import Lora

from .client import Client, DaemonError
from .lora_weights import LoraWeights
from .ptune import PromptTuning

__all__ = ["CausalLMOutput", "RemoteBlockRange", "RemoteBlocks", "RemoteModelForCausalLM", "resolve_model_dir"]


def resolve_model_dir(name: str | os.PathLike[str], client: Client) -> Path:
    """A model dir, or a model name the daemon has in its local store (GET /v1/models gives its `path`)."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    try:
        entries = client.get("/v1/models").get("data", [])
    except DaemonError as e:
        raise FileNotFoundError(
            f"{name!s} is no model dir, and the daemon could not be asked for it: {e.message}"
        ) from e
    for entry in entries:
        if entry.get("id") == str(name) and entry.get("path"):
            return Path(entry["path"])
    raise FileNotFoundError(
        f"{name!s} is neither a model dir nor a model in the daemon's local store: the client side (embeddings, "
        f"head) runs here, so pull it first with `petalctl models pull {name!s}`, or pass the model dir"
    )


@dataclass(frozen=True)
class _Call:
    """What one remote forward/backward needs besides its tensors (fixed for both directions)."""

    client: Client
    model: str
    start: int
    end: int
    mask: torch.Tensor | None
    lora_keys: tuple[str, ...] = ()
    lora_scale: float = 1.0
    opts: dict[str, Any] = field(default_factory=dict)
    keep: bool = False  # a backward can follow: the swarm keeps this forward's activations for it

    def lora(self, values: Sequence[torch.Tensor]) -> Lora | None:
        if not self.lora_keys:
            return None
        return Lora(self.lora_scale, {k: v.detach() for k, v in zip(self.lora_keys, values, strict=True)})


class RemoteBlocks(torch.autograd.Function):
    """Blocks [start, end) in the swarm as one differentiable op: `apply(call, hidden, prompts, *lora_values)`.

    When a backward can follow (`_Call.keep`: grad mode is on and an input, the prompts or a LoRA weight requires
    grad), the forward asks the swarm to keep its activations and saves the daemon's ``forward_id``: the backward
    then runs only the servers' backward passes. The inputs are saved too and sent again with the backward, so
    servers that lost their activations (or a forward without ``keep``) recompute them (as Petals does).
    """

    @staticmethod
    def forward(
        ctx: Any, call: _Call, hidden: torch.Tensor, prompts: torch.Tensor | None, *lora_values: torch.Tensor
    ) -> torch.Tensor:
        ctx.call = call
        ctx.has_prompts = prompts is not None
        ctx.save_for_backward(hidden, *(() if prompts is None else (prompts,)), *lora_values)
        args = dict(
            mask=call.mask,
            prompts=None if prompts is None else prompts.detach().contiguous(),
            start=call.start,
            end=call.end,
            lora=call.lora(lora_values),
            **call.opts,
        )
        ctx.forward_id = None
        if call.keep:
            out, ctx.forward_id = call.client.forward_keep(call.model, hidden.detach().contiguous(), **args)
        else:
            out = call.client.forward(call.model, hidden.detach().contiguous(), **args)
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        hidden = saved[0]
        prompts = saved[1] if ctx.has_prompts else None
        lora_values = saved[2:] if ctx.has_prompts else saved[1:]
        grad_in, grad_prompts, grad_lora = call.client.backward(
            call.model,
            hidden.detach().contiguous(),
            grad_out.contiguous(),
            mask=call.mask,
            prompts=None if prompts is None else prompts.detach().contiguous(),
            start=call.start,
            end=call.end,
            lora=call.lora(lora_values),
            forward_id=ctx.forward_id,
            **call.opts,
        )
        ctx.forward_id = None  # the kept activations serve one backward
        lora_grads: list[torch.Tensor | None] = []
        for key, value in zip(call.lora_keys, lora_values, strict=True):
            g = None if grad_lora is None else grad_lora.get(key)
            lora_grads.append(None if g is None else g.to(value.dtype))
        gp = None if prompts is None or grad_prompts is None else grad_prompts.to(prompts.dtype)
        return (None, grad_in.to(hidden.dtype), gp, *lora_grads)


@dataclass
class CausalLMOutput:
    """Like transformers' output: `loss` (when labels were given), `logits` [B, T, V], `hidden_states`.

    `hidden_states` holds only the output of the last remote block (after removing the prompt positions), not
    every layer's: intermediate states stay on the servers.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RemoteBlockRange(nn.Module):
    """Blocks [start, end) of a `RemoteModelForCausalLM` as a module, with the model's deep prompts and LoRA.

    Use it to build custom paths: local modules between remote ranges, early exits, probes.
    """

    def __init__(self, model: RemoteModelForCausalLM, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= model.num_blocks:
            raise ValueError(f"block range [{start}, {end}) is not inside the model's {model.num_blocks} blocks")
        self._model = [model]  # a list keeps the model out of this module's parameters
        self.start, self.end = start, end

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`hidden` [B, T, H] -> [B, T, H]; `prompts` overrides the model's deep prompts ([end-start, B, P, H])."""
        return self._model[0].run_blocks(hidden, attention_mask, self.start, self.end, prompts=prompts)


class RemoteModelForCausalLM(nn.Module):
    """Embeddings, final norm and head local; blocks [start, end) remote. Trainable: prompts, LoRA, anything local.

    The local parts are frozen (`requires_grad=False`) by default; unfreeze them if you want to train them.
    """

    def __init__(
        self,
        info: ModelInfo,
        parts: ClientPartsBase,
        client: Client,
        *,
        start: int = 0,
        end: int | None = None,
        **opts: Any,
    ) -> None:
        super().__init__()
        self.info, self.config, self.client = info, info.config, client
        self.model_name = info.name
        self.num_blocks = info.num_blocks
        self.start, self.end = start, info.num_blocks if end is None else end
        if not 0 <= self.start < self.end <= self.num_blocks:
            raise ValueError(
                f"block range [{self.start}, {self.end}) is not inside the model's {self.num_blocks} blocks"
            )
        self.parts = parts.requires_grad_(False)
        self.prompts: PromptTuning | None = None
        self.lora: LoraWeights | None = None
        self.opts = opts  # codec, allowed, blocked: passed to every daemon call
        # a forward that a backward can follow asks the swarm to keep its activations (False: servers recompute them)
        self.keep_activations = True
        self.dtype = next(parts.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_name: str | os.PathLike[str],
        socket: str | os.PathLike[str] | None = None,
        *,
        start: int = 0,
        end: int | None = None,
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] | None = None,
        timeout: float = 300.0,
        **opts: Any,
    ) -> RemoteModelForCausalLM:
        """Load the local parts of a model dir (or a model in the daemon's store) and talk to the daemon at `socket`.

        `tuning_mode` is None, "ptune", "deep_ptune" (with `pre_seq_len` prompts) or "lora" (rank/alpha/targets).
        """
        client = Client(socket, timeout=timeout)
        info = open_model(resolve_model_dir(model_dir_or_name, client))
        model = cls(info, load_client_parts(info, dtype=dtype), client, start=start, end=end, **opts)
        if tuning_mode in ("ptune", "deep_ptune"):
            model.enable_ptune(pre_seq_len or 16, deep=tuning_mode == "deep_ptune")
        elif tuning_mode == "lora":
            model.enable_lora(rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
        elif tuning_mode is not None:
            raise ValueError(f"unknown tuning_mode {tuning_mode!r}; use 'ptune', 'deep_ptune' or 'lora'")
        return model

    # --- trainable extensions -----------------------------------------------------------------------------------

    def enable_ptune(self, prompt_len: int, *, deep: bool = False, seed: int | None = None) -> PromptTuning:
        """Add trainable prompts, initialised from the embeddings of random vocabulary tokens."""
        g = make_generator(seed)
        ids = torch.randint(0, int(self.config.vocab_size), (1, prompt_len), generator=g)
        with torch.no_grad():
            init = self.parts.embed(ids)[0].float()
        self.prompts = PromptTuning(
            prompt_len,
            int(self.config.hidden_size),
            deep=deep,
            start=self.start,
            end=self.end,
            init=init,
            dtype=self.dtype,
        )
        return self.prompts

    def enable_lora(
        self,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] | None = None,
        blocks: Sequence[int] | None = None,
    ) -> LoraWeights:
        """Add trainable LoRA weights (PEFT's init: the model's output is unchanged until trained)."""
        blocks = range(self.start, self.end) if blocks is None else blocks
        self.lora = LoraWeights(self.config, rank=rank, alpha=alpha, targets=targets, blocks=blocks, dtype=self.dtype)
        return self.lora

    def set_prompts(self, prompts: PromptTuning | None) -> None:
        self.prompts = prompts

    def set_lora(self, lora: LoraWeights | None) -> None:
        self.lora = lora

    # --- forward ------------------------------------------------------------------------------------------------

    def blocks(self, start: int, end: int) -> RemoteBlockRange:
        """Blocks [start, end) alone, as a differentiable module (with this model's deep prompts and LoRA)."""
        return RemoteBlockRange(self, start, end)

    def run_blocks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        start: int,
        end: int,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blocks [start, end) on `hidden` through the swarm, differentiable w.r.t. hidden, prompts and LoRA."""
        if prompts is None and self.prompts is not None and self.prompts.deep:
            prompts = self.prompts.deep_for(start, end, hidden.shape[0])
        lora = None if self.lora is None else self.lora.for_blocks(start, end)
        keys = tuple(lora.weights) if lora is not None else ()
        values = tuple(lora.weights[k] for k in keys) if lora is not None else ()
        call = _Call(
            self.client,
            self.model_name,
            start,
            end,
            attention_mask,
            keys,
            lora.scale if lora is not None else 1.0,
            dict(self.opts),
            keep=self.keep_activations
            and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (hidden, prompts, *values)),
        )
        out: torch.Tensor = RemoteBlocks.apply(call, hidden, prompts, *values)  # type: ignore[no-untyped-call, unused-ignore]  # torch: apply is unannotated (flagged only when strict)
        return out

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input embeddings with the soft prompts (if any) in front, and the matching mask."""
        embeds = self.parts.embed(input_ids).to(self.dtype)
        if self.prompts is not None:
            embeds, attention_mask = self.prompts.prepend(embeds, attention_mask)
        return embeds, attention_mask

    @property
    def prompt_len(self) -> int:
        return 0 if self.prompts is None else self.prompts.prompt_len

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """Logits for every input position (prompt positions removed); `loss` as transformers computes it
        (next-token cross-entropy, labels -100 ignored) when `labels` are given."""
        embeds, mask = self.embed(input_ids, attention_mask)
        hidden = self.run_blocks(embeds, mask, self.start, self.end)[:, self.prompt_len :]
        logits = self.parts.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(loss, logits, (hidden,) if output_hidden_states else None)

    __call__: Any

    # --- inference ----------------------------------------------------------------------------------------------

    @contextmanager
    def inference_session(self, max_length: int, batch: int = 1, *, stream: bool = True) -> Iterator[Any]:
        """A daemon inference session over [start, end) (servers keep the KV cache), with the deep prompts and the
        LoRA weights (their current values: sent once, at open; the servers apply them to every step).

        `session.step(hidden, mask=None, reorder=None)` takes hidden states (embed them yourself, soft prompts
        included); `reorder` (beam search) makes row i a copy of row `reorder[i]` first. The session is one WebSocket
        stream on the socket (`Client.session_stream`); `stream=False` uses one HTTP request per step instead
        (`Client.open_session`).
        """
        prompts = None
        if self.prompts is not None and self.prompts.deep:
            deep = self.prompts.deep_for(self.start, self.end, batch)
            prompts = None if deep is None else deep.detach().contiguous()
        lora = None if self.lora is None else self.lora.for_blocks(self.start, self.end)
        if lora is not None:
            lora = Lora(lora.scale, {k: v.detach().contiguous() for k, v in lora.weights.items()})
        open_session = self.client.session_stream if stream else self.client.open_session
        session = open_session(
            self.model_name,
            max_length,
            batch=batch,
            start=self.start,
            end=self.end,
            prompts=prompts,
            lora=lora,
            **self.opts,
        )
        try:
            yield session
        finally:
            session.close()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        prompt_lookup_num_tokens: int = 0,
    ) -> torch.Tensor:
        """`[B, T]` -> `[B, T + new]` (rows that ended early are padded with the end-of-sequence token).

        One inference session for all rows (the servers keep the KV cache, and apply the LoRA weights if set):
        each new token costs one step, O(n) in all. Beam search (`num_beams > 1`, greedy) runs one session of
        `num_beams` rows per input row and reorders the servers' cache rows between steps; its tokens equal
        transformers' `generate(num_beams=..., do_sample=False)` (same `length_penalty` and `early_stopping`).
        `prompt_lookup_num_tokens=K` (greedy, one row): speculative decoding as transformers' argument of that name,
        guesses of up to K tokens by prompt lookup checked in one step each (`petal.kernels.speculative`); the
        tokens are those of plain greedy decoding, in fewer swarm round trips.
        """
        if self.start != 0 or self.end != self.num_blocks:
            raise ValueError("generate needs the whole model: load it with start=0 and end=None")
        eos = self._eos_ids(eos_token_id)
        if num_beams > 1:
            if do_sample:
                raise ValueError("beam search here is greedy (do_sample=False); sample with num_beams=1")
            rows = [
                self._beam_row(input_ids[b : b + 1], max_new_tokens, num_beams, eos, length_penalty, early_stopping)
                for b in range(input_ids.shape[0])
            ]
            width = max(r.shape[0] for r in rows)
            pad = next(iter(sorted(eos))) if eos else 0
            return torch.stack([F.pad(r, (0, width - r.shape[0]), value=pad) for r in rows])
        out = input_ids.clone()
        for nxt in self.iter_generate(
            input_ids,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            eos_token_id=sorted(eos),
            seed=seed,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        ):
            out = torch.cat([out, nxt[:, None]], dim=1)
        return out

    def iter_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        prompt_lookup_num_tokens: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Yield each new token `[B]` as it is sampled (rows that ended get the end-of-sequence token), until
        `max_new_tokens` or every row has ended: `generate` one token at a time, for streaming."""
        if self.start != 0 or self.end != self.num_blocks:
            raise ValueError("generate needs the whole model: load it with start=0 and end=None")
        eos = self._eos_ids(eos_token_id)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        ).validate()
        generator = make_generator(seed)
        batch = input_ids.shape[0]
        seen = [row.tolist() for row in input_ids]
        done = torch.zeros(batch, dtype=torch.bool)
        pad = next(iter(sorted(eos))) if eos else 0
        eos_ids = torch.tensor(sorted(eos), dtype=input_ids.dtype)
        if prompt_lookup_num_tokens > 0:
            if batch != 1 or params.temperature > 0:
                raise ValueError("prompt_lookup_num_tokens needs greedy decoding (do_sample=False) of one row")
            yield from self._iter_speculative(input_ids, params, eos, prompt_lookup_num_tokens)
            return
        with self.inference_session(self.prompt_len + input_ids.shape[1] + max_new_tokens, batch=batch) as session:
            with torch.no_grad():
                embeds, _ = self.embed(input_ids)
            for _ in range(max_new_tokens):
                hidden = session.step(embeds.contiguous())
                with torch.no_grad():
                    logits = self.parts.logits(hidden[:, -1:].to(self.dtype))[:, -1]
                rows = [sample_next(logits[b].float(), params, seen[b], generator) for b in range(batch)]
                nxt = torch.where(done, torch.full((batch,), pad), torch.tensor(rows)).to(input_ids.dtype)
                for b in range(batch):
                    seen[b].append(int(nxt[b]))
                done |= torch.isin(nxt, eos_ids)
                yield nxt
                if bool(done.all()):
                    return
                with torch.no_grad():
                    embeds = self.parts.embed(nxt[:, None]).to(self.dtype)

    def _iter_speculative(
        self, input_ids: torch.Tensor, params: SamplingParams, eos: set[int], draft: int
    ) -> Iterator[torch.Tensor]:
        """Greedy decoding of one row with prompt-lookup guesses checked in one step each; rejected guesses are
        dropped by sending the next step at their position (the daemon rolls the session back there)."""
        ids = input_ids[0].tolist()
        generated: list[int] = []
        length = self.prompt_len + len(ids) + params.max_new_tokens + draft
        with self.inference_session(length) as session:
            with torch.no_grad():
                embeds, _ = self.embed(input_ids)
            guesses: list[int] = []
            k = DraftLength(draft)
            position = None
            while True:
                hidden = session.step(embeds.contiguous(), None, None, position)
                with torch.no_grad():
                    logits = self.parts.logits(hidden[:, -1 - len(guesses) :].to(self.dtype))[0]

                def pick(i: int, got: list[int], rows: torch.Tensor = logits) -> int:
                    return sample_next(rows[i].float(), params, ids + generated + got)

                picked = check_guesses(guesses, pick)
                k.update(len(guesses), len(picked) - 1)
                # the next step is written after the kept guesses (None: after everything sent)
                position = None if len(picked) > len(guesses) else session.position - len(guesses) + len(picked) - 1
                for token in picked:
                    generated.append(token)
                    yield torch.tensor([token], dtype=input_ids.dtype)
                    if token in eos or len(generated) == params.max_new_tokens:
                        return
                guesses = lookup_draft(ids + generated, min(k.now, params.max_new_tokens - len(generated) - 1))
                with torch.no_grad():
                    embeds = self.parts.embed(torch.tensor([[generated[-1], *guesses]])).to(self.dtype)

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is None:
            try:
                from transformers import GenerationConfig

                eos_token_id = GenerationConfig.from_pretrained(self.info.path).eos_token_id
            except (OSError, ValueError):
                eos_token_id = getattr(self.config, "eos_token_id", None)
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}

    def _beam_row(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        num_beams: int,
        eos: set[int],
        length_penalty: float,
        early_stopping: bool | str,
    ) -> torch.Tensor:
        """One prompt `[1, T]` by beam search over one session of `num_beams` rows (see `petal.kernels.beams`)."""
        search = BeamSearch(num_beams, max_new_tokens, eos, length_penalty, early_stopping)
        length = self.prompt_len + ids.shape[1] + max_new_tokens
        with self.inference_session(length, batch=num_beams) as session:
            with torch.no_grad():
                embeds, _ = self.embed(ids.expand(num_beams, -1))
            reorder: list[int] | None = None
            while True:
                hidden = session.step(embeds.contiguous(), None, reorder)
                with torch.no_grad():
                    logits = self.parts.logits(hidden[:, -1:].to(self.dtype))[:, -1]
                reorder, tokens = search.step(logits)
                if search.done:
                    break
                with torch.no_grad():
                    embeds = self.parts.embed(torch.tensor(tokens, dtype=ids.dtype)[:, None]).to(self.dtype)
        return torch.cat([ids[0], torch.tensor(search.best, dtype=ids.dtype)])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as transformers' causal LM loss."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
