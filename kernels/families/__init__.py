"""One module per model family (Llama, Mistral, Qwen2, Qwen3, Mixtral, Falcon, BLOOM, ...): see `base.py`.

Adding a family = one new module + one line in `_FAMILIES`. A module is the family itself (module-level names, as
`bloom.py`), or holds it as `FAMILY` (the Llama-likes: a `decoder.DecoderFamily` with the module's `read_config`).
The Llama-like families share the block code of `decoder.py` and differ only in how they read config.json; none of
them imports transformers (BLOOM does, when a BLOOM model is used). Mixtral (`mixtral.py`: decoder.py's attention with
a mixture-of-experts MLP) and Falcon (`falcon.py`: fused q/k/v, LayerNorm, parallel attention) bring their own blocks
on decoder.py's config, masks and rotary runner, as do Gemma 2 and Gemma 3 text (`gemma2.py`: sandwich norms,
soft-capped attention with explicit scores; `gemma3.py` only reads its config); a family whose blocks differ in
layout from transformers' in-memory layers (Mixtral's fused experts) also has `adopt_layer(config, layer, index)`
for `Span.from_model`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # base imports torch; this registry stays importable without it
    from .base import FamilyModule

_FAMILIES: dict[str, str] = {
    "llama": "petal.kernels.families.llama",
    "mistral": "petal.kernels.families.mistral",
    "qwen2": "petal.kernels.families.qwen2",
    "qwen3": "petal.kernels.families.qwen3",
    "mixtral": "petal.kernels.families.mixtral",
    "falcon": "petal.kernels.families.falcon",
    "gemma2": "petal.kernels.families.gemma2",
    "gemma3_text": "petal.kernels.families.gemma3",
    "bloom": "petal.kernels.families.bloom",
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def get_family(config: object) -> FamilyModule:
    """The family module for a config (ours or transformers'), dispatching on `config.model_type`."""
    return family_for(getattr(config, "model_type", None))


def family_for(model_type: object) -> FamilyModule:
    """The family module for a `model_type` string, e.g. config.json's; the error lists what is supported."""
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model family {model_type!r}: petal supports {', '.join(SUPPORTED_FAMILIES)}; "
            "pick a model of one of these families or add a module under kernels/families/"
        )
    module = importlib.import_module(_FAMILIES[model_type])
    return cast("FamilyModule", getattr(module, "FAMILY", module))  # Llama-likes: a `decoder.DecoderFamily`
