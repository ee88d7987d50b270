"""Reading LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``) into a
`Lora`: for the client (``petal.ctl.adapters``, which also writes them) and for servers hosting adapters
(``petald --adapter``).

Keys look like ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (Llama) or
``base_model.model.transformer.h.{i}.self_attention.query_key_value.lora_B.weight`` (BLOOM): the block's checkpoint
prefix under ``base_model.model.``. Our ``Lora`` keys are ``{i}.{module path}.lora_A``; the scale is
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). Only plain LoRA is read: DoRA, LoRA biases, per-module ranks
or alphas, fan-in-fan-out layers and extra trained modules are rejected with a message instead of silently dropped.
Pickled ``adapter_model.bin`` files are never loaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from petal.protocol.lora import Lora, lora_key

__all__ = ["CONFIG_NAME", "PEFT_PREFIX", "WEIGHTS_NAME", "AdapterError", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<prefix>(?:[A-Za-z_]\w*\.)*?)(?P<block>\d+)\.(?P<path>[A-Za-z0-9_.]+)"
    r"\.lora_(?P<which>[AB])(?:\.default)?\.weight$"
)


class AdapterError(ValueError):
    """The adapter dir cannot be written or read as plain PEFT LoRA; the message says what to change."""


def _check_config(config: object, path: Path) -> tuple[float, int]:
    """(scale, r) of a plain LoRA config; AdapterError for anything the wire format cannot carry."""
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters are supported"
        )
    unsupported = [
        name
        for name, bad in (
            ("use_dora", bool(config.get("use_dora"))),
            ("fan_in_fan_out", bool(config.get("fan_in_fan_out"))),
            ("bias", config.get("bias", "none") != "none"),
            ("lora_bias", bool(config.get("lora_bias"))),
            ("rank_pattern", bool(config.get("rank_pattern"))),
            ("alpha_pattern", bool(config.get("alpha_pattern"))),
            ("modules_to_save", bool(config.get("modules_to_save"))),
        )
        if bad
    ]
    if unsupported:
        raise AdapterError(
            f"{path}: {', '.join(unsupported)} cannot be read as plain LoRA; "
            "train a plain LoRA (one rank and alpha, no bias, no DoRA, no extra modules)"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, int | float):
        raise AdapterError(f"{path}: 'r' must be a positive integer and 'lora_alpha' a number, got {r!r} and {alpha!r}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return float(scale), r


def load_adapter(adapter_dir: str | Path) -> tuple[Lora, dict[str, Any]]:
    """Read a PEFT LoRA adapter dir (ours or peft's ``save_pretrained``): the ``Lora`` and the config dict."""
    root = Path(adapter_dir)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{root} has no {CONFIG_NAME}; is it a PEFT adapter dir?")
    if not weights_path.is_file():
        hint = (
            " (only safetensors are read: pickled .bin files are never loaded; re-save with safetensors)"
            if (root / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"{root} has no {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    scale, r = _check_config(config, config_path)
    weights: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(weights_path)).items():
        m = _PEFT_KEY.fullmatch(name)
        if m is None:
            raise AdapterError(
                f"{weights_path}: tensor {name!r} is not a LoRA A/B weight of a transformer block; "
                "only plain LoRA on block linear layers can be served"
            )
        key = lora_key(int(m["block"]), m["path"], m["which"])
        if key in weights:
            raise AdapterError(f"{weights_path}: {key} appears twice (several adapters in one file?)")
        weights[key] = t
    if not weights:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    lora = Lora(scale, weights)
    ranks = {t.shape[0] for k, t in weights.items() if k.endswith("lora_A")}
    if ranks != {r}:
        raise AdapterError(f"{root}: the config says r={r} but the weights have rank(s) {sorted(ranks)}")
    return lora, config
