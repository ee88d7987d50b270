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

from petal.kernels.families.base import ClientPartsBase
from petal.kernels.sampling import SamplingParams, make_generator, sample_next
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

    def lora(self, values: Sequence[torch.Tensor]) -> Lora | None:
        if not self.lora_keys:
            return None
        return Lora(self.lora_scale, {k: v.detach() for k, v in zip(self.lora_keys, values, strict=True)})


class RemoteBlocks(torch.autograd.Function):
    """Blocks [start, end) in the swarm as one differentiable op: `apply(call, hidden, prompts, *lora_values)`.

    The inputs are saved, not the servers' activations: backward sends them again and the servers recompute
    (as Petals does), so a server holds nothing between the two calls.
    """

    @staticmethod
    def forward(
        ctx: Any, call: _Call, hidden: torch.Tensor, prompts: torch.Tensor | None, *lora_values: torch.Tensor
    ) -> torch.Tensor:
        ctx.call = call
        ctx.has_prompts = prompts is not None
        ctx.save_for_backward(hidden, *(() if prompts is None else (prompts,)), *lora_values)
        out = call.client.forward(
            call.model,
            hidden.detach().contiguous(),
            mask=call.mask,
            prompts=None if prompts is None else prompts.detach().contiguous(),
            start=call.start,
            end=call.end,
            lora=call.lora(lora_values),
            **call.opts,
        )
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
            **call.opts,
        )
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
        """A daemon inference session over [start, end) (servers keep the KV cache), with the deep prompts.

        `session.step(hidden, mask=None)` takes hidden states (embed them yourself, soft prompts included);
        LoRA is not applied in sessions (the socket's sessions carry no LoRA): use `forward` for that. The session
        is one WebSocket stream on the socket (`Client.session_stream`); `stream=False` uses one HTTP request per
        step instead (`Client.open_session`).
        """
        prompts = None
        if self.prompts is not None and self.prompts.deep:
            deep = self.prompts.deep_for(self.start, self.end, batch)
            prompts = None if deep is None else deep.detach().contiguous()
        open_session = self.client.session_stream if stream else self.client.open_session
        session = open_session(
            self.model_name, max_length, batch=batch, start=self.start, end=self.end, prompts=prompts, **self.opts
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
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """`[B, T]` -> `[B, T + new]` (rows that ended early are padded with the end-of-sequence token).

        Greedy and sampling use one inference session (the servers keep the KV cache), unless LoRA is set: then
        every step runs a full forward of the whole sequence, O(n^2) compute, because sessions carry no LoRA.
        Beam search (`num_beams > 1`) always runs full forwards of all beams per step: the simplest correct way
        to reorder beams without a server-side cache reorder; it costs num_beams x T tokens of compute per step.
        """
        if self.start != 0 or self.end != self.num_blocks:
            raise ValueError("generate needs the whole model: load it with start=0 and end=None")
        eos = self._eos_ids(eos_token_id)
        if num_beams > 1:
            return self._beam_search(input_ids, max_new_tokens, num_beams, eos)
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
        out = input_ids.clone()
        done = torch.zeros(batch, dtype=torch.bool)
        pad = next(iter(eos)) if eos else 0

        def pick(logits: torch.Tensor) -> torch.Tensor:
            rows = [sample_next(logits[b].float(), params, out[b].tolist(), generator) for b in range(batch)]
            nxt = torch.tensor(rows, dtype=out.dtype)
            return torch.where(done, torch.full_like(nxt, pad), nxt)

        if self.lora is not None:
            for _ in range(max_new_tokens):
                nxt = pick(self.forward(out).logits[:, -1])
                out = torch.cat([out, nxt[:, None]], dim=1)
                done |= torch.isin(nxt, torch.tensor(sorted(eos), dtype=nxt.dtype))
                if bool(done.all()):
                    break
            return out
        with self.inference_session(self.prompt_len + input_ids.shape[1] + max_new_tokens, batch=batch) as session:
            embeds, _ = self.embed(input_ids)
            for _ in range(max_new_tokens):
                hidden = session.step(embeds.contiguous())
                nxt = pick(self.parts.logits(hidden[:, -1:].to(self.dtype))[:, -1])
                out = torch.cat([out, nxt[:, None]], dim=1)
                done |= torch.isin(nxt, torch.tensor(sorted(eos), dtype=nxt.dtype))
                if bool(done.all()):
                    break
                embeds = self.parts.embed(nxt[:, None]).to(self.dtype)
        return out

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

    def _beam_search(self, input_ids: torch.Tensor, max_new_tokens: int, num_beams: int, eos: set[int]) -> torch.Tensor:
        """Beam search as transformers does it (length_penalty 1, early_stopping False), one row at a time."""
        rows = [self._beam_row(input_ids[b : b + 1], max_new_tokens, num_beams, eos) for b in range(input_ids.shape[0])]
        width = max(r.shape[0] for r in rows)
        pad = next(iter(eos)) if eos else 0
        return torch.stack([F.pad(r, (0, width - r.shape[0]), value=pad) for r in rows])

    def _beam_row(self, ids: torch.Tensor, max_new_tokens: int, num_beams: int, eos: set[int]) -> torch.Tensor:
        prompt = ids.shape[1]
        beams = ids.expand(num_beams, -1).clone()
        scores = torch.full((num_beams,), float("-inf"))
        scores[0] = 0.0  # all beams start identical: only the first may expand at step one
        finished: list[tuple[float, torch.Tensor]] = []
        for step in range(max_new_tokens):
            logp = F.log_softmax(self.forward(beams).logits[:, -1].float(), dim=-1)
            vocab = logp.shape[-1]
            total = (scores[:, None] + logp).view(-1)
            top, idx = torch.topk(total, 2 * num_beams)
            next_beams, next_scores = [], []
            for score, flat in zip(top.tolist(), idx.tolist(), strict=True):
                beam, token = divmod(flat, vocab)
                seq = torch.cat([beams[beam], torch.tensor([token], dtype=beams.dtype)])
                if token in eos:
                    finished.append((score / (seq.shape[0] - prompt) ** 1.0, seq))
                else:
                    next_beams.append(seq)
                    next_scores.append(score)
                if len(next_beams) == num_beams:
                    break
            beams, scores = torch.stack(next_beams), torch.tensor(next_scores)
            if len(finished) >= num_beams:
                best_possible = float(scores.max()) / (step + 1)
                if best_possible <= max(s for s, _ in finished):
                    break
        finished += [(float(s) / (b.shape[0] - prompt), b) for s, b in zip(scores, beams, strict=True)]
        return max(finished, key=lambda x: x[0])[1]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as transformers' causal LM loss."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
