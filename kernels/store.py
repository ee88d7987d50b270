"""The local model store: open a Hugging Face style model dir and load just the blocks a server hosts.

A model is a dir with config.json, safetensors weights (one file, or shards listed in
model.safetensors.index.json) and tokenizer files. Blocks are built on the meta device and filled with only
their own tensors, read one by one with `safe_open`, so hosting blocks [a, b) of a 70B model never needs
memory (or disk reads) for the other blocks.

Fingerprint (`ModelInfo.fingerprint`): the first 16 hex digits of a SHA-256 over, in this order,
  1. the config fields in `FINGERPRINT_CONFIG_FIELDS` that the config has (architecture: sizes, heads,
     positions, norms, activation, tied head), as canonical JSON, read as the family's `read_config` gives them
     (petal's own reading since the Llama-like families stopped using transformers' configs, which changed
     fingerprints once: transformers 5 also exposed `rope_parameters` as `rope_scaling`);
  2. every tensor of the checkpoint, sorted by name: name, shape, dtype (from the safetensors headers);
  3. a sample of each tensor's stored bytes: its first and last `FINGERPRINT_SAMPLE_BYTES` bytes.
Part 3 is what tells a fine-tune from its base model (same names and shapes, different values) without
reading the whole checkpoint. Not included: the model's name, tokenizer, generation settings, file layout
(sharding), and transformers' version, so re-sharding or renaming a dir keeps its fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import nn

from .families import family_for, get_family
from .families.base import ClientPartsBase
from .span import Span

__all__ = [
    "FINGERPRINT_CONFIG_FIELDS",
    "FINGERPRINT_SAMPLE_BYTES",
    "ModelInfo",
    "ModelStoreError",
    "load_client_parts",
    "load_span",
    "open_model",
]

FINGERPRINT_CONFIG_FIELDS: tuple[str, ...] = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "apply_residual_connection_post_layernorm",
    "n_head",
    "n_layer",
    # fields that change what the same weights compute: windows, soft-caps and score scale (Mistral, Qwen, Gemma),
    # expert routing (Mixtral), block layout (Falcon); absent from Llama configs: their fingerprints stay as they were
    "sliding_window",
    "layer_types",
    "max_window_layers",
    "use_sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "num_local_experts",
    "num_experts_per_tok",
    "parallel_attn",
    "new_decoder_architecture",
    "multi_query",
    "alibi",
)
FINGERPRINT_SAMPLE_BYTES = 4096

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


class ModelStoreError(RuntimeError):
    """A model dir is missing something or does not match the architecture; the message says what to do."""


@dataclass(frozen=True)
class _TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int


@dataclass
class ModelInfo:
    """A model dir opened for loading: config, family, and where every tensor lives."""

    path: Path
    config: Any  # the family's `read_config` of config.json: `DecoderConfig` for Llama-likes, BLOOM's BloomConfig
    name: str
    family: str
    num_blocks: int
    tensors: dict[str, _TensorEntry] = field(repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Short stable hex hash of architecture + weight layout + weight samples (see module docstring)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.config, self.tensors)
        return self._fingerprint


def open_model(path: str | Path) -> ModelInfo:
    """Read config.json (with the family's own `read_config`: no transformers for the Llama-like families) and the
    safetensors headers of the model dir `path` (no weights are read)."""
    try:
        path = Path(path).expanduser().resolve()
        has_config = (path / "config.json").is_file()
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, ~user of no such user, a NUL byte
        raise ModelStoreError(f"{str(path)[:200]!r} is not a model dir ({type(e).__name__}: {e})") from None
    if not has_config:
        raise ModelStoreError(f"{path} is not a model dir (no config.json); pull one with `petald pull smollm2`")
    try:
        fields = json.loads((path / "config.json").read_text())
        if not isinstance(fields, dict):
            raise ValueError("config.json is not a JSON object")
        family = fields.get("model_type")
        config = family_for(family).read_config(fields)  # an unknown family fails here, listing the supported ones
        name = getattr(config, "petal_name", None) or path.name
        num_blocks = int(config.num_hidden_layers)
        tensors = _read_layout(path)
    except ModelStoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, struct.error) as e:
        # invalid JSON, an unknown model_type, a missing field, a corrupt safetensors header, ...
        raise ModelStoreError(
            f"{path} is not a usable model dir ({type(e).__name__}: {str(e)[:300]}); pull the model again "
            "or fix its config.json"
        ) from None
    return ModelInfo(
        path=path, config=config, name=str(name), family=str(family), num_blocks=num_blocks, tensors=tensors
    )


PULL_RECORD = "petal-source.json"
"""What `petald pull ORG/NAME` fetched into a dir (daemon/hub.py writes it): a partial pull keeps every shard at full
size with the tensors it did not fetch as holes, which read as zeros, so loading them must be refused here."""


def check_held(info: ModelInfo, start: int = 0, end: int = 0, *, client: bool = False) -> None:
    """Raise ModelStoreError when a partial Hub pull in `info.path` lacks blocks [start, end) or (with `client`) the
    client parts, saying which `petald pull` fetches them; any other dir passes."""
    try:
        source = json.loads((info.path / PULL_RECORD).read_text())
    except (OSError, ValueError):
        return
    if not isinstance(source, dict) or source.get("source") != "hub":
        return
    repo = source.get("repo", info.name)
    if client and not source.get("client", True):
        raise ModelStoreError(
            f"{info.path} holds only served blocks, not the embeddings and head; fetch them with "
            f"`petald pull {repo} --client-only`"
        )
    spans = source.get("blocks")
    if end > start and isinstance(spans, list):
        held = {b for span in spans if isinstance(span, list) and len(span) == 2 for b in range(span[0], span[1])}
        missing = [b for b in range(start, end) if b not in held]
        if missing:
            raise ModelStoreError(
                f"{info.path} does not hold blocks {missing[0]}..{missing[-1]}; fetch them with "
                f"`petald pull {repo} --blocks {start}:{end}`"
            )


def load_span(
    info: ModelInfo,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant: str = "none",
) -> Span:
    """Blocks [start, end) of `info` as a `Span`, reading only those blocks' tensors.

    `quant` is "none" or "int8" (weight-only int8 on CPU, LLM.int8 on CUDA; see `petal.kernels.int8`).
    """
    if not 0 <= start < end <= info.num_blocks:
        raise ModelStoreError(f"span [{start}, {end}) is not inside the model's {info.num_blocks} blocks")
    if quant not in ("none", "int8"):
        raise ModelStoreError(f"unknown quantization {quant!r}; use 'none' or 'int8'")
    check_held(info, start, end)
    family = get_family(info.config)
    blocks = []
    for index in range(start, end):
        with torch.device("meta"):
            block = family.make_block(info.config, index)
        prefix = family.block_prefix(index)
        names = {key: prefix + key for key in block.state_dict()}
        _fill(block, names, info, dtype, device, f"block {index}", partial(family.make_block, info.config, index))
        blocks.append(block)
    span = Span(info.config, blocks, start)
    if quant == "int8":
        from .int8 import quantize_span

        quantize_span(span, torch.device(device))
    return span


def load_client_parts(
    info: ModelInfo, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ClientPartsBase:
    """The family's `ClientParts` (embeddings, final norm, head; tied or not) filled from the checkpoint."""
    check_held(info, client=True)
    family = get_family(info.config)
    with torch.device("meta"):
        parts = family.ClientParts(info.config)
    names = family.client_param_names(info.config)
    _fill(parts, names, info, dtype, device, "the client parts", partial(family.ClientParts, info.config))
    parts.eval()
    return parts


def _fill(
    module: nn.Module,
    names: dict[str, str],
    info: ModelInfo,
    dtype: torch.dtype,
    device: str | torch.device,
    what: str,
    factory: Callable[[], nn.Module],
) -> None:
    """Assign checkpoint tensors to every state-dict entry of a meta-built `module`, then rebuild the rest."""
    expected = module.state_dict()
    for key, ckpt in names.items():
        entry = info.tensors.get(ckpt)
        if entry is None:
            raise ModelStoreError(
                f"{info.path} lacks tensor {ckpt!r} needed by {what}; the dir is incomplete or holds another "
                "architecture: pull the model again"
            )
        if entry.shape != tuple(expected[key].shape):
            raise ModelStoreError(
                f"tensor {ckpt!r} in {info.path} has shape {list(entry.shape)} but {what} expects "
                f"{list(expected[key].shape)}; config.json does not match the weights"
            )
    read = _read_tensors(info, names.values(), device, dtype)
    state = {key: read[ckpt] for key, ckpt in names.items()}  # a tied tensor serves two keys
    del read
    module.load_state_dict(state, strict=True, assign=True)  # assign: the read tensors become the parameters
    _rebuild_meta_buffers(module, device, factory)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _read_tensors(
    info: ModelInfo, names: Iterable[str], device: str | torch.device, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each shard once; the only place that touches weight bytes.

    With `dtype`, each floating tensor is cast as soon as it is read, so a load never holds more than one tensor in
    the checkpoint's dtype beside the cast copies (the module then takes those over with `assign=True`)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(info.tensors[name].file, []).append(name)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                out[name] = tensor if dtype is None else _cast(tensor, dtype)
                del tensor
    return out


def _rebuild_meta_buffers(module: nn.Module, device: str | torch.device, factory: Callable[[], nn.Module]) -> None:
    """Non-persistent buffers (e.g. rotary inv_freq) are not in checkpoints and stay on meta after loading.

    They derive from the config, so when any remain, `factory` builds one fresh copy of the module on the
    target device and its buffers are taken over (parameters of that copy are discarded). Today's Llama and
    BLOOM blocks have no such buffers, so this costs nothing for them.
    """
    stale = [name for name, t in module.named_buffers() if t.is_meta]
    if not stale:
        return
    with torch.device(device):
        fresh = dict(factory().named_buffers())
    for name in stale:
        owner_name, _, buf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if name not in fresh or fresh[name].is_meta:
            raise ModelStoreError(f"buffer {name!r} is neither in the checkpoint nor rebuilt by the module itself")
        owner._buffers[buf] = fresh[name]


def _read_layout(path: Path) -> dict[str, _TensorEntry]:
    """Name -> file, dtype, shape and byte range of every tensor, from the safetensors headers only."""
    if (path / _INDEX_FILE).is_file():
        index = json.loads((path / _INDEX_FILE).read_text())
        files = sorted({path / f for f in index.get("weight_map", {}).values()})
    elif (path / _SINGLE_FILE).is_file():
        files = [path / _SINGLE_FILE]
    else:
        raise ModelStoreError(f"{path} has no {_SINGLE_FILE} or {_INDEX_FILE}; pull the model again")
    tensors: dict[str, _TensorEntry] = {}
    for file in files:
        if not file.is_file():
            raise ModelStoreError(f"shard {file.name} listed in {_INDEX_FILE} is missing; pull the model again")
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, stop = meta["data_offsets"]
            offset = 8 + header_len + begin
            tensors[name] = _TensorEntry(file, meta["dtype"], tuple(meta["shape"]), offset, stop - begin)
    return tensors


def _fingerprint(config: Any, tensors: dict[str, _TensorEntry]) -> str:
    digest = hashlib.sha256()
    arch = {k: getattr(config, k) for k in FINGERPRINT_CONFIG_FIELDS if getattr(config, k, None) is not None}
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        entry = tensors[name]
        digest.update(json.dumps([name, list(entry.shape), entry.dtype]).encode())
    with contextlib.ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}  # each shard opened once, all closed on exit
        for name in sorted(tensors):
            entry = tensors[name]
            f = handles.get(entry.file)
            if f is None:
                f = handles[entry.file] = stack.enter_context(open(entry.file, "rb"))
            n = min(FINGERPRINT_SAMPLE_BYTES, entry.nbytes)
            f.seek(entry.offset)
            digest.update(f.read(n))
            f.seek(entry.offset + entry.nbytes - n)
            digest.update(f.read(n))
    return digest.hexdigest()[:16]
