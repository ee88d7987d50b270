"""LoRA adapters in PEFT's on-disk format, so what a client trains through the swarm loads with `peft` and back.

A PEFT LoRA adapter dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (Llama) or
``base_model.model.transformer.h.{i}.self_attention.query_key_value.lora_B.weight`` (BLOOM): the block's
checkpoint prefix (the family's ``block_prefix``) under ``base_model.model.``. Our ``Lora`` keys are
``{i}.{module path}.lora_A``; the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).

Only plain LoRA is read: DoRA, LoRA biases, per-module ranks or alphas, fan-in-fan-out layers and extra trained
modules have no equivalent in the wire format, so they are rejected with a message instead of silently dropped.
Pickled ``adapter_model.bin`` files are never loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from petal.kernels.families import get_family
from petal.kernels.families.base import FamilyModule
from petal.kernels.peft import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, AdapterError, load_adapter
from petal.protocol.lora import Lora, split_key

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterError", "load_adapter", "save_adapter"]  # reading: kernels.peft


def _family_module(family: str) -> FamilyModule:
    try:
        return get_family(SimpleNamespace(model_type=family))
    except ValueError as e:
        raise AdapterError(str(e)) from None


def save_adapter(
    lora: Lora,
    out_dir: str | Path,
    *,
    base_model: str,
    rank: int,
    alpha: float,
    targets: list[str],
    family: str,
) -> Path:
    """Write ``lora`` as a PEFT LoRA adapter dir (config + safetensors) loadable by ``PeftModel.from_pretrained``.

    ``rank`` and ``alpha`` must agree with the weights (every A is ``[rank, in]``, ``lora.scale == alpha / rank``);
    ``targets`` are PEFT ``target_modules`` (e.g. ``["q_proj", "v_proj"]``); ``family`` is the model's
    ``model_type`` ("llama", "bloom"). Returns the dir.
    """
    fam = _family_module(family)
    if rank < 1 or not math.isclose(alpha / rank, lora.scale, rel_tol=1e-6):
        raise AdapterError(
            f"lora_alpha / r = {alpha} / {rank} = {alpha / max(rank, 1):g} but the adapter's scale is "
            f"{lora.scale:g}; pass the alpha and rank it was trained with"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, t in lora.weights.items():
        block, path, which = split_key(key)
        if which == "A" and t.shape[0] != rank:
            raise AdapterError(
                f"{key} has rank {t.shape[0]}, not r={rank}; PEFT adapters have one rank for all modules"
            )
        if not any(path == m or path.endswith("." + m) for m in targets):
            raise AdapterError(f"{key}: module {path!r} is not in target_modules {targets}; add it to targets")
        name = f"{PEFT_PREFIX}{fam.block_prefix(block)}{path}.lora_{which}.weight"
        tensors[name] = t.detach().to("cpu").contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "layers_to_transform": lora.blocks,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out
