"""Turn a GGUF checkpoint into a plain safetensors model dir (local files only, no network).

The swarm loads blocks lazily from safetensors (`petal.kernels.store`), so every model must first exist as
an ordinary Hugging Face dir. GGUF files are dequantized to float32 here: a server quantizes again on load
(`petal.kernels.int8`) in whatever format suits its device.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when converting, not when the daemon starts
    from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = ["ConversionError", "convert_gguf"]


class ConversionError(RuntimeError):
    """The GGUF file could not be turned into a usable safetensors dir."""


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    quiet: bool = False,
    require_chat_template: bool = True,
) -> Path:
    """Load `gguf_path` with transformers (float32) and save model + tokenizer as safetensors into `out_dir`.

    The GGUF quantizer state is dropped before saving: otherwise transformers would write a
    `quantization_config` that makes every later load go through the GGUF path again. `name`, when given,
    is written into config.json as `petal_name` (the swarm-wide model name, see `petal.kernels.store`).
    `quiet` silences transformers' own progress bars (they would spam logs when not on a terminal); its GGUF
    reader uses a bare tqdm that ignores transformers' switch, so stderr is redirected while it runs.
    `require_chat_template`: refuse a GGUF without one (a chat model's pull); any GGUF can still serve blocks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers: unannotated
    try:
        with (
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stderr(devnull) if quiet else contextlib.nullcontext(),
        ):
            return _convert(gguf_path, out_dir, name, require_chat_template, AutoModelForCausalLM, AutoTokenizer)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # transformers: unannotated


def _convert(
    gguf_path: Path,
    out_dir: Path,
    name: str | None,
    require_chat_template: bool,
    auto_model: type[AutoModelForCausalLM],
    auto_tokenizer: type[AutoTokenizer],
) -> Path:
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file {gguf_path} does not exist; pull the model again (`petald pull NAME`)")
    src_dir, file_name = str(gguf_path.parent), gguf_path.name
    model = auto_model.from_pretrained(src_dir, gguf_file=file_name, dtype=torch.float32)
    tokenizer = auto_tokenizer.from_pretrained(src_dir, gguf_file=file_name)

    odd = [n for n, m in model.named_modules() if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear]
    if odd:
        raise ConversionError(f"GGUF weights were not dequantized (e.g. {odd[0]}); cannot save plain safetensors")
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers: an undeclared plain attribute
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if name is not None:
        model.config.petal_name = name
    model.config.dtype = torch.float32

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    saved = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in saved:
        raise ConversionError(f"{out_dir}/config.json still carries a quantization_config; refusing a GGUF-bound dir")
    if require_chat_template and not tokenizer.chat_template:
        raise ConversionError(f"{gguf_path.name} carries no chat template; the converted model could not chat")
    return out_dir
