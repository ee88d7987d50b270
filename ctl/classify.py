"""Sequence classification over the swarm (paper Fig. 4): soft prompts or LoRA remote, a linear head local.

The representation of a sequence is the final-normed hidden state of its last real token (as transformers'
`LlamaForSequenceClassification` pools); the head `score` is trained on the client together with the prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .remote_model import RemoteModelForCausalLM

__all__ = ["RemoteModelForSequenceClassification", "SequenceClassifierOutput", "last_token_index"]


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [B, num_labels]


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """Index of each row's last real token: works for left and right padding alike."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    positions = torch.arange(length, device=attention_mask.device)[None]
    return (positions * attention_mask.long()).argmax(-1)


class RemoteModelForSequenceClassification(nn.Module):
    """A `RemoteModelForCausalLM` body (its prompts/LoRA trainable) plus a local `score` head [H -> num_labels]."""

    def __init__(self, body: RemoteModelForCausalLM, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.body = body
        self.num_labels = num_labels
        self.score = nn.Linear(int(body.config.hidden_size), num_labels, bias=False, dtype=body.dtype)
        nn.init.normal_(self.score.weight, std=0.02)

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_name: str | os.PathLike[str],
        socket: str | os.PathLike[str] | None = None,
        *,
        num_labels: int = 2,
        **kwargs: Any,
    ) -> RemoteModelForSequenceClassification:
        """Like `RemoteModelForCausalLM.from_pretrained` (tuning_mode, pre_seq_len, ...) plus `num_labels`."""
        return cls(RemoteModelForCausalLM.from_pretrained(model_dir_or_name, socket, **kwargs), num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        """Class logits `[B, num_labels]`; cross-entropy `loss` when `labels` `[B]` are given."""
        body = self.body
        embeds, mask = body.embed(input_ids, attention_mask)
        hidden = body.run_blocks(embeds, mask, body.start, body.end)[:, body.prompt_len :]
        idx = last_token_index(attention_mask, input_ids.shape[0], input_ids.shape[1])
        pooled = hidden[torch.arange(hidden.shape[0]), idx.to(hidden.device)]
        norm: nn.Module = getattr(body.parts, "norm", None) or body.parts.get_submodule("ln_f")
        logits = self.score(norm(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return SequenceClassifierOutput(loss, logits)
