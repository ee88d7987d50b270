"""PEFT adapter format: ours loads in peft with the same logits as our hooks; peft's loads in ours to the same weights.

Logits tolerance TOL (max |diff| / max(1, max |ref|), fp32; measured 0: the same ops); loaded weights must be bit-equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file

from petal.ctl.adapters import AdapterError, load_adapter, save_adapter
from petal.kernels.lora import apply_lora, lora_targets
from petal.kernels.span import Span
from petal.protocol.lora import Lora
from tests.support.tinymodels import tiny_bloom, tiny_llama

TOL = 1e-5
CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"], lambda m, x: x, lambda m, h: m.lm_head(m.model.norm(h))),
    "bloom": (
        tiny_bloom,
        ["query_key_value"],
        lambda m, x: m.transformer.word_embeddings_layernorm(x),
        lambda m, h: m.lm_head(m.transformer.ln_f(h)),
    ),
}


def random_lora(config, targets: list[str], blocks: list[int], rank: int = 4, scale: float = 2.0) -> Lora:
    g = torch.Generator().manual_seed(1)
    shapes = lora_targets(config)
    weights = {}
    for i in blocks:
        for path, (fan_in, fan_out) in shapes.items():
            if path.rsplit(".", 1)[-1] in targets:
                weights[f"{i}.{path}.lora_A"] = 0.2 * torch.randn(rank, fan_in, generator=g)
                weights[f"{i}.{path}.lora_B"] = 0.2 * torch.randn(fan_out, rank, generator=g)
    return Lora(scale, weights)


def our_logits(model, lora: Lora, pre, head, embeds: torch.Tensor) -> torch.Tensor:
    span = Span.from_model(model, 0, model.config.num_hidden_layers)
    with torch.no_grad(), apply_lora(lora, enumerate(span.blocks)):
        return head(model, span(pre(model, embeds)))


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("blocks", [None, [1, 4]], ids=["all-blocks", "some-blocks"])
def test_our_adapter_loads_in_peft(tmp_path: Path, family: str, blocks: list[int] | None) -> None:
    make, targets, pre, head = CASES[family]
    model = make()
    blocks = blocks or list(range(model.config.num_hidden_layers))
    lora = random_lora(model.config, targets, blocks)
    out = save_adapter(lora, tmp_path / "adapter", base_model="tiny", rank=4, alpha=8, targets=targets, family=family)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    torch.manual_seed(3)
    embeds = torch.randn(2, 5, 64)
    want = our_logits(model, lora, pre, head, embeds)
    pm = peft.PeftModel.from_pretrained(make(), out)
    with torch.no_grad():
        got = pm(inputs_embeds=embeds).logits
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    print(f"{family}: peft vs our hooks, max rel |diff| {err:.2e}")
    assert err <= TOL
    with torch.no_grad():
        base = make()(inputs_embeds=embeds).logits
    assert (got - base).abs().max() > 1e-3  # the adapter was really applied
    again, config = load_adapter(out)
    assert config["r"] == 4 and again.scale == lora.scale
    assert set(again.weights) == set(lora.weights)
    assert all(torch.equal(again.weights[k], t) for k, t in lora.weights.items())


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_adapter_loads_in_ours(tmp_path: Path, family: str) -> None:
    make, targets, pre, head = CASES[family]
    torch.manual_seed(7)
    config = peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(make(), config)
    pm.save_pretrained(tmp_path / "peft")
    lora, cfg = load_adapter(tmp_path / "peft")
    assert lora.scale == 4 / 8 and cfg["peft_type"] == "LORA"
    pattern = re.compile(r".*\.(\d+)\.(.+)\.lora_(A|B)\.default\.weight$")
    expected = {}
    for name, p in pm.named_parameters():
        m = pattern.fullmatch(name)
        if m:
            expected[f"{m.group(1)}.{m.group(2)}.lora_{m.group(3)}"] = p.detach()
    assert set(lora.weights) == set(expected) and len(expected) == 2 * len(targets) * 6
    assert all(torch.equal(lora.weights[k], t) for k, t in expected.items())
    torch.manual_seed(3)
    embeds = torch.randn(1, 4, 64)
    with torch.no_grad():
        want = pm(inputs_embeds=embeds).logits
    got = our_logits(make(), lora, pre, head, embeds)
    assert (got - want).abs().max().item() / max(1.0, want.abs().max().item()) <= TOL


def test_unsupported_adapters_are_rejected_clearly(tmp_path: Path) -> None:
    model = tiny_llama()
    lora = random_lora(model.config, ["q_proj"], [0])
    with pytest.raises(AdapterError, match="scale is 2"):
        save_adapter(lora, tmp_path / "x", base_model="t", rank=4, alpha=4, targets=["q_proj"], family="llama")
    with pytest.raises(AdapterError, match="not in target_modules"):
        save_adapter(lora, tmp_path / "x", base_model="t", rank=4, alpha=8, targets=["v_proj"], family="llama")
    with pytest.raises(AdapterError, match="unsupported model family"):
        save_adapter(lora, tmp_path / "x", base_model="t", rank=4, alpha=8, targets=["q_proj"], family="gpt9")
    out = save_adapter(lora, tmp_path / "a", base_model="t", rank=4, alpha=8, targets=["q_proj"], family="llama")
    config = json.loads((out / "adapter_config.json").read_text())
    for change, match in [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"r": 8}, "rank\\(s\\) \\[4\\]"),
    ]:
        (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=match):
            load_adapter(out)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="not a LoRA A/B weight"):
        load_adapter(out)
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="never loaded"):
        load_adapter(out)
    with pytest.raises(AdapterError, match=r"no adapter_config.json"):
        load_adapter(tmp_path)
