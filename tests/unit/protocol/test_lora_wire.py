"""LoRA on the wire: round trips exactly, and every malformed field gets a clear error naming the problem."""

from __future__ import annotations

import msgpack
import pytest
import torch

from petal.protocol.errors import PetalError, WireError
from petal.protocol.lora import Lora, decode_lora_grads, encode_lora, encode_lora_grads, parse_lora, split_key
from petal.protocol.tensors import encode_tensor

MAX = 1 << 20


def sample(r: int = 4) -> Lora:
    g = torch.Generator().manual_seed(0)
    return Lora(
        0.5,
        {
            "3.self_attn.q_proj.lora_A": torch.randn(r, 16, generator=g),
            "3.self_attn.q_proj.lora_B": torch.randn(24, r, generator=g),
            "7.mlp.down_proj.lora_A": torch.randn(r, 32, generator=g, dtype=torch.float32).to(torch.bfloat16),
            "7.mlp.down_proj.lora_B": torch.randn(16, r, generator=g).to(torch.bfloat16),
        },
    )


def wire(lora: Lora, codec: str = "none") -> dict:
    """Through msgpack bytes, as a peer would receive it."""
    return msgpack.unpackb(msgpack.packb(encode_lora(lora, codec)), raw=False)


def test_round_trip_is_exact() -> None:
    lora = sample()
    back = parse_lora(wire(lora), max_bytes=MAX)
    assert back.scale == 0.5 and set(back.weights) == set(lora.weights)
    for k, t in lora.weights.items():
        assert back.weights[k].dtype == t.dtype and torch.equal(back.weights[k], t)


def test_q8_codec_round_trip_is_close() -> None:
    lora = sample()
    back = parse_lora(wire(lora, "q8"), max_bytes=MAX)
    a = lora.weights["3.self_attn.q_proj.lora_A"]
    assert (back.weights["3.self_attn.q_proj.lora_A"] - a).abs().max() <= 0.02 * a.abs().max()


def test_for_blocks_and_modules() -> None:
    lora = sample()
    assert lora.blocks == [3, 7]
    sub = lora.for_blocks(0, 5)
    assert sub is not None and sub.blocks == [3] and sub.scale == 0.5 and len(sub.weights) == 2
    assert lora.for_blocks(4, 7) is None
    assert lora.for_blocks(7, 8).blocks == [7]  # type: ignore[union-attr]
    a, b = lora.modules(3)["self_attn.q_proj"]
    assert a.shape == (4, 16) and b.shape == (24, 4)
    assert lora.modules(5) == {}


def test_split_key() -> None:
    assert split_key("12.self_attention.query_key_value.lora_B") == (12, "self_attention.query_key_value", "B")
    for bad in ("x.q.lora_A", "3.q.lora_C", "3.lora_A", "3..q.lora_A", "3.q proj.lora_A", "-1.q.lora_A", 5):
        with pytest.raises(WireError, match="must look like"):
            split_key(bad)  # type: ignore[arg-type]


def test_grads_round_trip_and_shape_checks() -> None:
    lora = sample()
    grads = {k: torch.randn(t.shape) for k, t in lora.weights.items()}
    back = decode_lora_grads(msgpack.unpackb(msgpack.packb(encode_lora_grads(grads))), lora, max_bytes=MAX)
    assert all(torch.allclose(back[k], grads[k].to(lora.weights[k].dtype)) for k in grads)
    assert back["7.mlp.down_proj.lora_A"].dtype == torch.bfloat16
    wrong = dict(grads, **{"3.self_attn.q_proj.lora_A": torch.randn(4, 17)})
    with pytest.raises(WireError, match="expected \\[4, 16\\]"):
        decode_lora_grads(encode_lora_grads(wrong), lora, max_bytes=MAX)
    fewer = {k: v for k, v in grads.items() if not k.startswith("7.")}
    with pytest.raises(WireError, match="missing"):
        decode_lora_grads(encode_lora_grads(fewer), lora, max_bytes=MAX)
    with pytest.raises(WireError, match="no grad_lora"):
        decode_lora_grads(None, lora, max_bytes=MAX)


def _mutate(**changes: object) -> dict:
    obj = wire(sample())
    weights = obj["weights"]
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "error", "code", "match"),
    [
        ([1, 2], WireError, "bad_frame", "keys 'scale' and 'weights'"),
        ({"scale": 1.0}, WireError, "bad_frame", "keys 'scale' and 'weights'"),
        ({"scale": 1.0, "weights": {}, "x": 1}, WireError, "bad_frame", "keys 'scale' and 'weights'"),
        ({"scale": "1", "weights": {}}, PetalError, "bad_request", "finite number"),
        ({"scale": float("nan"), "weights": {}}, PetalError, "bad_request", "finite number"),
        ({"scale": True, "weights": {}}, PetalError, "bad_request", "finite number"),
        ({"scale": 1.0, "weights": []}, WireError, "bad_frame", "must be a map"),
        ({"scale": 1.0, "weights": {}}, PetalError, "bad_request", "no weights"),
    ],
)
def test_malformed_structure(obj: object, error: type, code: str, match: str) -> None:
    with pytest.raises(error, match=match) as e:
        parse_lora(obj, max_bytes=MAX)
    assert e.value.code == code


def test_unpaired_key() -> None:
    with pytest.raises(PetalError, match=r"'7.mlp.down_proj.lora_B' is missing") as e:
        parse_lora(_mutate(**{"7__mlp__down_proj__lora_B": None}), max_bytes=MAX)
    assert e.value.code == "bad_request"


def test_bad_key_syntax() -> None:
    obj = _mutate()
    obj["weights"]["3.self_attn.q_proj.weight"] = obj["weights"].pop("3.self_attn.q_proj.lora_A")
    with pytest.raises(WireError, match="must look like"):
        parse_lora(obj, max_bytes=MAX)


def test_rank_mismatch_within_pair() -> None:
    obj = _mutate(**{"3__self_attn__q_proj__lora_B": encode_tensor(torch.randn(24, 5))})
    with pytest.raises(PetalError, match="ranks r must be equal") as e:
        parse_lora(obj, max_bytes=MAX)
    assert e.value.code == "wrong_shape"


@pytest.mark.parametrize(
    ("tensor", "error", "match"),
    [
        (torch.randn(4, 16, 1), PetalError, "2-D"),
        (torch.randn(0, 16), PetalError, "2-D"),
        (torch.ones(4, 16, dtype=torch.int64), WireError, "float32, float16 or bfloat16"),
        (torch.full((4, 16), float("inf")), WireError, "NaN or infinite"),
        (torch.full((4, 16), float("nan")), WireError, "NaN or infinite"),
    ],
)
def test_bad_tensors(tensor: torch.Tensor, error: type, match: str) -> None:
    obj = _mutate(**{"3__self_attn__q_proj__lora_A": encode_tensor(tensor)})
    with pytest.raises(error, match=match):
        parse_lora(obj, max_bytes=MAX)


def test_garbled_tensor_names_the_key() -> None:
    obj = _mutate()
    obj["weights"]["3.self_attn.q_proj.lora_A"]["data"] = b"\x00" * 3
    with pytest.raises(WireError, match=r"'3.self_attn.q_proj.lora_A'.*bytes") as e:
        parse_lora(obj, max_bytes=MAX)
    assert e.value.code == "bad_tensor"


def test_total_size_is_bounded_before_allocation() -> None:
    lora = sample()
    total = lora.nbytes
    parse_lora(wire(lora), max_bytes=total)  # exactly at the limit is fine
    with pytest.raises(WireError, match="exceeds the limit") as e:
        parse_lora(wire(lora), max_bytes=total - 1)
    assert e.value.code == "too_large"
    huge = {"dtype": "float32", "shape": [1 << 20, 1 << 20], "codec": "none", "data": b""}  # declared, not sent
    with pytest.raises(WireError, match="exceeds the limit"):
        parse_lora(_mutate(**{"3__self_attn__q_proj__lora_A": huge}), max_bytes=MAX)


def test_python_side_construction_is_checked_too() -> None:
    with pytest.raises(PetalError, match="is missing"):
        Lora(1.0, {"0.q.lora_A": torch.zeros(2, 3)})
    with pytest.raises(PetalError, match="finite"):
        Lora(float("inf"), {"0.q.lora_A": torch.zeros(2, 3), "0.q.lora_B": torch.zeros(3, 2)})
    trainable = torch.zeros(2, 3, requires_grad=True)
    lora = Lora(1.0, {"0.q.lora_A": trainable, "0.q.lora_B": torch.zeros(3, 2)})
    assert parse_lora(encode_lora(lora), max_bytes=MAX).weights["0.q.lora_A"].shape == (2, 3)
