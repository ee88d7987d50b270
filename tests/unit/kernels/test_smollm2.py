"""The real SmolLM2-135M-Instruct through chained spans: identical greedy tokens (fp32), int8 top-1 agreement."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petal.daemon.demo import greedy_tokens
from petal.kernels.store import load_client_parts, load_span, open_model

pytestmark = pytest.mark.smollm2

CUTS = [(0, 10), (10, 20), (20, 30)]
TEXT = (
    "The river begins high in the mountains, where snow melts each spring and feeds a hundred small streams. "
    "By the time it reaches the valley it is wide and slow, and farmers along its banks have used its water "
    "for centuries to grow wheat, barley and grapes. In the old town, a stone bridge built by the Romans still "
    "carries people and bicycles across, although cars have used the new bridge since 1970."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    info = open_model(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    return info, tokenizer, model


def test_pulled_dir_is_plain_safetensors_with_chat_template(smollm2):
    info, tokenizer, _ = smollm2
    config = json.loads((info.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (info.name, info.family, info.num_blocks) == ("smollm2", "llama", 30)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_chained_spans_generate_identical_greedy_tokens(smollm2):
    info, tokenizer, model = smollm2
    parts = load_client_parts(info)
    spans = [load_span(info, a, b) for a, b in CUTS]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, max_new_tokens=32)[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    ours = list(greedy_tokens(parts, spans, ids, 32, eos))
    assert len(ref) >= 8, "reference answer unexpectedly short; pick another prompt"
    assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))


def test_int8_spans_agree_with_fp32_on_top1(smollm2):
    info, tokenizer, _ = smollm2
    parts = load_client_parts(info)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        fp32 = parts.embed(ids)
        int8 = fp32.clone()
        for a, b in CUTS:
            fp32 = load_span(info, a, b)(fp32)
            int8 = load_span(info, a, b, quant="int8")(int8)
        agree = (parts.logits(fp32).argmax(-1) == parts.logits(int8).argmax(-1)).float().mean().item()
    print(f"int8 top-1 agreement with fp32 over {ids.shape[1]} tokens: {agree:.3%}")
    # Measured ~98-99% (docs/benchmarks.md). 90% leaves room for other CPUs' bf16 rounding while still
    # failing for a broken quantizer (wrong scales or layouts drop agreement far below 50%).
    assert agree >= 0.90
