"""One module per model family (Llama, BLOOM, ...); each exposes the interface described in `base.py`.

Adding a family = one new module + one line in `_FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # base imports torch; this registry stays importable without it
    from .base import FamilyModule

_FAMILIES: dict[str, str] = {
    "llama": "petal.kernels.families.llama",
    "bloom": "petal.kernels.families.bloom",
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def get_family(config: object) -> FamilyModule:
    """The family module for a transformers config, dispatching on `config.model_type`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model family {model_type!r}: petal supports {', '.join(SUPPORTED_FAMILIES)}; "
            "pick a model of one of these families or add a module under kernels/families/"
        )
    return cast("FamilyModule", importlib.import_module(_FAMILIES[model_type]))
