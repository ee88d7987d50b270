"""Soft prompts owned by the client: prompt tuning (`ptune`) and deep prompt tuning (`deep_ptune`).

`ptune` learns P input embeddings that are prepended to every sequence (Lester et al., 2021). `deep_ptune`
learns, in addition, one [P, H] prompt per block; the servers add it to the first P positions of the hidden
states before running that block (daemon `_add_prompts`), and return its gradient with the backward pass.
The prompts never leave the client except as request fields: servers keep no state between calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["PROMPTS_FILE", "PromptTuning", "load_prompts"]

PROMPTS_FILE = "prompts.safetensors"
_CONFIG_FILE = "petal_prompts.json"


class PromptTuning(nn.Module):
    """Input prompts `[P, H]` and, with `deep`, per-block prompts `[blocks, P, H]` for blocks [start, end).

    Input prompts start from the embeddings of `init_ids` when given (random vocabulary tokens work better than
    noise); deep prompts start at zero so that a fresh `deep_ptune` model behaves exactly like `ptune`.
    """

    def __init__(
        self,
        prompt_len: int,
        hidden_size: int,
        *,
        deep: bool = False,
        start: int = 0,
        end: int = 0,
        init: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if deep and not 0 <= start < end:
            raise ValueError(f"deep prompts need a block range, got [{start}, {end})")
        self.prompt_len, self.hidden_size, self.deep, self.start, self.end = prompt_len, hidden_size, deep, start, end
        if init is None:
            init = torch.randn(prompt_len, hidden_size) * 0.02
        if tuple(init.shape) != (prompt_len, hidden_size):
            raise ValueError(f"init must be [{prompt_len}, {hidden_size}], got {list(init.shape)}")
        self.input_prompts = nn.Parameter(init.detach().to(dtype).clone())
        self.deep_prompts = (
            nn.Parameter(torch.zeros(end - start, prompt_len, hidden_size, dtype=dtype)) if deep else None
        )

    @property
    def method(self) -> str:
        return "deep_ptune" if self.deep else "ptune"

    def prepend(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, T, H]` -> `[B, P + T, H]` with the prompts first; the mask (if any) gains P ones in front."""
        batch = embeds.shape[0]
        prompts = self.input_prompts.to(embeds.dtype)[None].expand(batch, -1, -1)
        embeds = torch.cat([prompts, embeds], dim=1)
        if attention_mask is not None:
            ones = torch.ones(batch, self.prompt_len, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return embeds, attention_mask

    def deep_for(self, start: int, end: int, batch: int) -> torch.Tensor | None:
        """The deep prompts of blocks [start, end) as the servers take them: `[end - start, batch, P, H]`.

        Expanded (not copied) over the batch, so autograd sums the per-row gradients into the one prompt.
        """
        if self.deep_prompts is None:
            return None
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are outside the prompts' blocks [{self.start}, {self.end})")
        rows = self.deep_prompts[start - self.start : end - self.start]
        return rows[:, None].expand(-1, batch, -1, -1)

    def save(self, out_dir: str | Path, **meta: object) -> Path:
        """Write the prompts (safetensors) and a small JSON describing them into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"input_prompts": self.input_prompts.detach().float().contiguous()}
        if self.deep_prompts is not None:
            tensors["deep_prompts"] = self.deep_prompts.detach().float().contiguous()
        save_file(tensors, str(out / PROMPTS_FILE))
        config = {
            "method": self.method,
            "prompt_len": self.prompt_len,
            "hidden_size": self.hidden_size,
            "start": self.start,
            "end": self.end,
            **meta,
        }
        (out / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return out


def load_prompts(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PromptTuning, dict[str, object]]:
    """Read prompts saved by `PromptTuning.save`; returns the module and the saved JSON (model, fingerprint, ...)."""
    path = Path(path)
    if not (path / PROMPTS_FILE).is_file() or not (path / _CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} holds no saved prompts ({PROMPTS_FILE} and {_CONFIG_FILE}); train some "
            "with `petalctl finetune --method ptune --out DIR`"
        )
    config = json.loads((path / _CONFIG_FILE).read_text())
    tensors = load_file(str(path / PROMPTS_FILE))
    deep = "deep_prompts" in tensors
    module = PromptTuning(
        int(config["prompt_len"]),
        int(config["hidden_size"]),
        deep=deep,
        start=int(config.get("start", 0)),
        end=int(config.get("end", 0)),
        init=tensors["input_prompts"],
        dtype=dtype,
    )
    if deep:
        assert module.deep_prompts is not None
        with torch.no_grad():
            module.deep_prompts.copy_(tensors["deep_prompts"])
    return module, config
