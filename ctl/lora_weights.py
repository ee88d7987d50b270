"""Client-owned LoRA weights: trainable A/B pairs for chosen modules of chosen blocks.

The servers never store these: every forward/backward request carries the weights of the blocks it runs
(`petal.protocol.lora.Lora`), and the backward reply carries their gradients, which autograd routes back into
the parameters here. Initialisation follows PEFT (A kaiming-uniform with a=sqrt(5), B zeros), so a fresh
adapter changes nothing and training starts from the base model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from petal.kernels.lora import lora_targets
from petal.protocol.lora import Lora, lora_key, split_key

__all__ = ["DEFAULT_TARGETS", "LoraWeights"]

# PEFT's defaults for these families (transformers' TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}


def _param_name(key: str) -> str:
    return "w_" + key.replace(".", "__")


class LoraWeights(nn.Module):
    """A/B parameters for `targets` (module names or path suffixes, as PEFT's `target_modules`) of `blocks`.

    `weights()` gives the wire keys -> parameters; `for_blocks(a, b)` the `Lora` a request for [a, b) carries.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] | None = None,
        blocks: Iterable[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        num_blocks = int(config.num_hidden_layers)
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = tuple(targets or DEFAULT_TARGETS.get(str(config.model_type), ()))
        if not self.targets:
            raise ValueError(f"no default LoRA targets for {config.model_type!r}; pass targets=[...]")
        self.blocks = sorted(set(range(num_blocks) if blocks is None else blocks))
        if not self.blocks or not all(0 <= b < num_blocks for b in self.blocks):
            raise ValueError(f"LoRA blocks must be inside [0, {num_blocks}), got {self.blocks[:8]}")
        shapes = lora_targets(config)
        paths = [p for p in shapes if any(p == t or p.endswith("." + t) for t in self.targets)]
        if not paths:
            raise ValueError(
                f"no linear layer of a {config.model_type} block matches targets {list(self.targets)}; "
                f"its linear layers are {sorted(shapes)}"
            )
        self.paths = tuple(paths)
        self._keys: dict[str, str] = {}  # wire key -> parameter name
        for block in self.blocks:
            for path in paths:
                fan_in, fan_out = shapes[path]
                a = torch.empty(self.rank, fan_in, dtype=dtype)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                for which, value in (("A", a), ("B", torch.zeros(fan_out, self.rank, dtype=dtype))):
                    key = lora_key(block, path, which)
                    self._keys[key] = _param_name(key)
                    self.register_parameter(self._keys[key], nn.Parameter(value))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> dict[str, torch.Tensor]:
        """Wire key (`"<block>.<module path>.lora_A"`) -> the live parameter."""
        return {key: getattr(self, name) for key, name in self._keys.items()}

    def for_blocks(self, start: int, end: int) -> Lora | None:
        """The `Lora` for blocks [start, end) (parameters themselves, so gradients can reach them), or None."""
        subset = {k: t for k, t in self.weights().items() if start <= split_key(k)[0] < end}
        return Lora(self.scale, subset) if subset else None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy trained values in (same keys and shapes, e.g. from a saved adapter)."""
        mine = self.weights()
        if set(weights) != set(mine):
            missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
            raise ValueError(f"LoRA keys differ: missing {missing[:4]}, unexpected {extra[:4]}")
        with torch.no_grad():
            for key, value in weights.items():
                if value.shape != mine[key].shape:
                    raise ValueError(f"LoRA {key}: shape {list(value.shape)}, expected {list(mine[key].shape)}")
                mine[key].copy_(value)

    @classmethod
    def from_lora(cls, config: PretrainedConfig, lora: Lora, alpha: float | None = None) -> LoraWeights:
        """Trainable weights initialised from a `Lora` (e.g. a loaded adapter), keeping its blocks and modules."""
        blocks = sorted({split_key(k)[0] for k in lora.weights})
        paths = sorted({split_key(k)[1] for k in lora.weights})
        rank = int(next(iter(t for k, t in lora.weights.items() if k.endswith("lora_A"))).shape[0])
        out = cls(config, rank=rank, alpha=lora.scale * rank if alpha is None else alpha, targets=paths, blocks=blocks)
        missing = set(out.weights()) - set(lora.weights)
        if missing:
            raise ValueError(f"the LoRA does not cover every (block, module) pair; missing {sorted(missing)[:4]}")
        out.load_weights(dict(lora.weights))
        return out
