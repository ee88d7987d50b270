"""Our own Llama-like decoder block, in plain torch: the code behind the llama, mistral, qwen2 and qwen3 families.

Why not transformers' decoder layers: importing them costs ~1.5 s and ~100 MiB of a server's start (they pull in
torch._dynamo, torch.distributed.tensor, sympy, ...), and every call goes through keyword plumbing. The block here is
the same math (checked against transformers in tests/unit/kernels/test_families.py): RMSNorm, rotary embeddings
(rope types default, linear and llama3), grouped-query attention with `scaled_dot_product_attention` writing into our
preallocated `LayerSlot`, and a gated MLP. Submodules and parameters keep the checkpoint's names
(`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...), so loading, LoRA hooks and int8 need nothing special.

Continuous batching (`forward_segments`, `BlockRunner.run_block_segments`): several calls' token rows, concatenated
as `[1, N, H]`, go through the norms, projections and MLP once; attention runs per call (`Segment`: its rows, its
`Prepared` positions and masks, its own cache slot), so calls of different cache lengths, padding and `t` share a
batch. `kernels/span.py`'s `run_batched` drives it; `BlockRunner.batchable` refuses blocks a family changed.

What differs between the families is only how config.json is read (biases, q/k norms, sliding windows, defaults):
each family module has a `read_config(fields) -> DecoderConfig` and exposes `FAMILY = DecoderFamily(read_config)`,
which is everything else from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import LayerSlot
from . import base, get_family

__all__ = [
    "CLIENT_PREFIXES",
    "SUPPORTED_ACTIVATIONS",
    "SUPPORTED_ROPE_TYPES",
    "BlockRunner",
    "ClientParts",
    "DecoderBlock",
    "DecoderConfig",
    "DecoderFamily",
    "Prepared",
    "RMSNorm",
    "RopeConfig",
    "Segment",
    "as_decoder_config",
    "block_prefix",
    "client_param_names",
    "kv_shape",
    "make_block",
    "qwen_layer_windows",
]

# ClientParts state-dict prefix -> checkpoint prefix. With tied embeddings there is no lm_head (the head reuses
# embed_tokens.weight), so loading with `assign=True` cannot silently untie them.
CLIENT_PREFIXES: dict[str, str] = {
    "embed_tokens.": "model.embed_tokens.",
    "norm.": "model.norm.",
    "lm_head.": "lm_head.",
}

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

SUPPORTED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ---- config ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, read the way transformers standardizes `rope_parameters`/`rope_scaling`."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> RopeConfig:
        """From config.json: `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
        params = dict(fields.get("rope_scaling") or fields.get("rope_parameters") or {})
        theta = params.get("rope_theta", fields.get("rope_theta")) or 10000.0
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported: petal supports {', '.join(SUPPORTED_ROPE_TYPES)}; "
                "pick a model with one of these or add the type to kernels/families/decoder.py"
            )
        if float(params.get("partial_rotary_factor", fields.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported by petal's Llama-like blocks")
        if rope_type == "default":
            return cls(theta=float(theta))
        original = fields.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", fields.get("max_position_embeddings", 8192)
        )
        return cls(
            theta=float(theta),
            type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original),
        )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies `[head_dim / 2]` in float32 on CPU, as transformers' rope init functions give them."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old_len / self.low_freq_factor, old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


def _required(fields: Mapping[str, Any], name: str) -> int:
    value = fields.get(name)
    if value is None:
        raise ValueError(f"config.json lacks {name!r}, which a {fields.get('model_type')} block needs")
    return int(value)


@dataclass(frozen=True)
class DecoderConfig:
    """What a Llama-like block needs, typed; every other config.json field stays readable as an attribute.

    `getattr(config, "eos_token_id", None)`, `config.petal_name`, ... read `fields` (config.json as given), so callers
    that used transformers' config objects keep working. `sliding_windows[i]` is layer i's attention window (None:
    full attention).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    pad_token_id: int | None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_fields(
        cls,
        fields: Mapping[str, Any],
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        sliding_windows: Sequence[int | None] | None = None,
    ) -> DecoderConfig:
        """Read the shared fields of config.json (with the family's defaults already merged into `fields`)."""
        layers = _required(fields, "num_hidden_layers")
        hidden, heads = _required(fields, "hidden_size"), _required(fields, "num_attention_heads")
        act = str(fields.get("hidden_act") or "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported: petal supports {', '.join(SUPPORTED_ACTIVATIONS)}")
        windows = tuple(sliding_windows) if sliding_windows is not None else (None,) * layers
        if len(windows) != layers:
            raise ValueError(f"config.json gives {len(windows)} layer types for {layers} layers")
        pad = fields.get("pad_token_id")
        return cls(
            model_type=str(fields["model_type"]),
            hidden_size=hidden,
            intermediate_size=_required(fields, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(fields.get("num_key_value_heads") or heads),
            head_dim=int(fields.get("head_dim") or hidden // heads),
            vocab_size=_required(fields, "vocab_size"),
            rms_norm_eps=float(fields.get("rms_norm_eps") or 1e-6),
            hidden_act=act,
            rope=RopeConfig.from_fields(fields),
            max_position_embeddings=int(fields.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
            pad_token_id=None if pad is None else int(pad),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            sliding_windows=tuple(None if w is None else int(w) for w in windows),
            fields=dict(fields),
        )

    def __getattr__(self, name: str) -> Any:
        """Any other config.json field (only called when normal lookup fails)."""
        if name.startswith("__") or name == "fields":  # copy/pickle probe dunders before `fields` exists
            raise AttributeError(name)
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.model_type} config has no field {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """config.json's fields, as given."""
        return dict(self.fields)


def qwen_layer_windows(fields: Mapping[str, Any]) -> list[int | None]:
    """Qwen2/Qwen3 sliding windows: only with `use_sliding_window`, on the layers `layer_types` (or, without it,
    layers >= `max_window_layers`) mark as sliding; transformers' Qwen2Config/Qwen3Config rules."""
    layers = _required(fields, "num_hidden_layers")
    window = fields.get("sliding_window") if fields.get("use_sliding_window") else None
    types = fields.get("layer_types") or [
        "sliding_attention"
        if window is not None and i >= int(fields.get("max_window_layers", 28))
        else "full_attention"
        for i in range(layers)
    ]
    return [window if kind == "sliding_attention" else None for kind in types]


def as_decoder_config(config: object) -> DecoderConfig:
    """`config` itself, or a transformers config (tests, in-memory models) read by its family's rules."""
    if isinstance(config, DecoderConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"expected a DecoderConfig or a transformers config, got {type(config).__name__}")
    decoded: DecoderConfig = get_family(config).read_config(to_dict())
    return decoded


# ---- modules ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Llama's reference (and transformers') does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


@dataclass
class Prepared:
    """Per-call inputs shared by every block of a span: rotary cos/sin `[B, 1, t, head_dim]` and the masks."""

    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor  # [B, past + t], 1 = real token
    t: int
    masks: dict[int | None, torch.Tensor]  # attention window (None: full) -> additive mask [B, 1, t, past + t]
    causal: bool = False  # no past, no padding: plain causal attention, no mask (see `Attention._attend`)

    def mask(self, window: int | None) -> torch.Tensor:
        """The additive mask for a block with this attention window, built once per call."""
        found = self.masks.get(window)
        if found is None:
            found = self.masks[window] = base.causal_mask(self.key_mask, self.t, self.cos.dtype, window)
        return found


class Segment(NamedTuple):
    """One call's share of a continuous batch: its `batch` x `t` token rows, its `Prepared` and its cache slot."""

    batch: int
    t: int
    prepared: Prepared
    kv: LayerSlot | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, -1, length, head_dim)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; keys and values go through the span's cache slot."""

    def __init__(self, config: DecoderConfig, window: int | None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.window = window
        hidden, q_out, kv_out = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, prepared: Prepared, kv: LayerSlot | None) -> torch.Tensor:
        batch, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        projected: torch.Tensor = self.o_proj(self._attend(q, k, v, batch, t, prepared, kv))
        return projected

    def forward_segments(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """Continuous batching: `x` `[1, N, H]` holds the token rows of several calls one after the other; the
        projections run once over all of them, attention per call (its own positions, masks and cache slot)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        outs, offset = [], 0
        for seg in segments:
            rows = slice(offset, offset + seg.batch * seg.t)
            out = self._attend(q[0, rows], k[0, rows], v[0, rows], seg.batch, seg.t, seg.prepared, seg.kv)
            outs.append(out.reshape(1, -1, out.shape[-1]))
            offset = rows.stop
        projected: torch.Tensor = self.o_proj(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
        return projected

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: int,
        t: int,
        prepared: Prepared,
        kv: LayerSlot | None,
    ) -> torch.Tensor:
        """Attention of one call's projected rows (`batch * t` of them, any leading shape): `[batch, t, heads *
        head_dim]` before the output projection."""
        q = q.reshape(batch, t, -1, self.head_dim)
        k = k.reshape(batch, t, -1, self.head_dim)
        v = v.reshape(batch, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per-head norms before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = prepared.cos, prepared.sin
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(k, v)
        # a prompt without past or padding needs no mask: sdpa's causal kernel skips the hidden half of the scores
        # (2048 tokens: 52 instead of 98 ms a layer on one CPU thread, the same output); else the explicit mask
        causal = prepared.causal and (self.window is None or self.window >= t)
        mask = None if causal else prepared.mask(self.window)
        if self.groups > 1:
            if t == 1:  # decode: fold the query heads of a group onto their kv head instead of copying keys
                q = q.reshape(batch, self.kv_heads, self.groups, self.head_dim)
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling)
        return out.reshape(batch, self.heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, -1)


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self.act = SUPPORTED_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderBlock(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = Attention(config, config.sliding_windows[index])
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, prepared: Prepared, kv: LayerSlot | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), prepared, kv)
        out: torch.Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return out

    def forward_segments(self, hidden: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """`forward` of several calls at once (see `Attention.forward_segments`): norms and MLP are per row."""
        hidden = hidden + self.self_attn.forward_segments(self.input_layernorm(hidden), segments)
        out: torch.Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return out


# ---- the family interface (petal.kernels.families.base) --------------------------------------------------------


def make_block(config: object, index: int) -> nn.Module:
    """One decoder layer for absolute layer `index`, on the current default device."""
    return DecoderBlock(as_decoder_config(config), index)


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


def kv_shape(config: object) -> tuple[int, int]:
    cfg = as_decoder_config(config)
    return cfg.num_key_value_heads, cfg.head_dim


class ClientParts(base.ClientPartsBase):
    """Embeddings, final norm and head: the parts that stay with the client."""

    def __init__(self, config: object) -> None:
        super().__init__()
        cfg = as_decoder_config(config)
        self.tied = cfg.tie_word_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if self.tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.embed_tokens(input_ids)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)


def client_param_names(config: object) -> dict[str, str]:
    with torch.device("meta"):
        parts = ClientParts(config)
    return base.names_by_prefix(parts, CLIENT_PREFIXES)


class BlockRunner:
    """Builds the rotary cos/sin and masks once per call and feeds them to every block of the span."""

    def __init__(self, config: object) -> None:
        cfg = as_decoder_config(config)
        with torch.device("cpu"):  # spans may be built under meta; this tiny table moves to the input's device
            self.inv_freq = cfg.rope.inv_freq(cfg.head_dim)

    def prepare(self, attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> Prepared:
        positions = base.position_ids(attention_mask)[:, -t:]
        inv_freq = self.inv_freq.to(attention_mask.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, t, head_dim]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        causal = t > 1 and attention_mask.shape[1] == t and bool(attention_mask.all())
        return Prepared(cos=cos, sin=sin, key_mask=attention_mask, t=t, masks={}, causal=causal)

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, prepared: Prepared, kv: LayerSlot | None
    ) -> torch.Tensor:
        out: torch.Tensor = block(hidden, prepared, kv)
        return out

    def batchable(self, blocks: Sequence[nn.Module]) -> bool:
        """Whether `run_block_segments` may run these blocks: this runner's own `prepare`/`run_block` and blocks whose
        `forward` is `DecoderBlock.forward` with this module's `Attention` (a family that changes either, e.g. a
        subclass with another block, runs its calls one by one)."""
        return (
            type(self).prepare is BlockRunner.prepare
            and type(self).run_block is BlockRunner.run_block
            and all(
                type(b).forward is DecoderBlock.forward
                and isinstance(b, DecoderBlock)
                and type(b.self_attn).forward is Attention.forward
                and type(b.self_attn)._attend is Attention._attend
                for b in blocks
            )
        )

    def run_block_segments(self, block: nn.Module, hidden: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """One block over the rows of several calls (`hidden` `[1, N, H]`, `segments` in row order)."""
        assert isinstance(block, DecoderBlock)
        return block.forward_segments(hidden, segments)


class DecoderFamily:
    """The family interface (`base.FamilyModule`) of a Llama-like family: this module's code plus the family's own
    reading of config.json. A family module exposes one as `FAMILY`."""

    CLIENT_PREFIXES = CLIENT_PREFIXES
    ClientParts = ClientParts
    BlockRunner = BlockRunner

    def __init__(self, read_config: Callable[[Mapping[str, Any]], DecoderConfig]) -> None:
        self.read_config = read_config

    @staticmethod
    def make_block(config: object, index: int) -> nn.Module:
        return make_block(config, index)

    @staticmethod
    def block_prefix(index: int) -> str:
        return block_prefix(index)

    @staticmethod
    def client_param_names(config: object) -> dict[str, str]:
        return client_param_names(config)

    @staticmethod
    def kv_shape(config: object) -> tuple[int, int]:
        return kv_shape(config)
