"""Fine-tuning through real petald daemons: prompts and LoRA learn a synthetic task; adapters round-trip with PEFT;
`petalctl finetune` and `petalctl generate --adapter` work end to end.

One swarm for the module (three 10-block servers of a tiny random 30-block Llama + a client daemon, codec none).
The model's weights are drawn wider (initializer_range 0.3) than elsewhere so its head can express a sharp
distribution: with the usual 0.1, even a perfect adapter cannot push the loss far below ln(vocab).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from petal.ctl.cli import cli
from petal.ctl.finetune import Example, FinetuneConfig, load_adapter, save_adapter, train
from petal.ctl.remote_model import RemoteModelForCausalLM
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama
from tests.support.torchref import start_swarm

MODEL = "tiny-llama"
CHARS = "abcdefghijklmnopqrstuvwxyz !?."


def char_tokenizer(out: Path) -> None:
    """A character-level tokenizer (ids < 128) saved into the model dir, so the CLI can work from text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    ).save_pretrained(out)


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="petal-ft-", dir="/tmp"))
    ref = tiny_llama(
        num_hidden_layers=30,
        hidden_size=32,
        intermediate_size=64,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=1,
    )
    ref.save_pretrained(root / MODEL, safe_serialization=True)
    char_tokenizer(root / MODEL)
    swarm = Swarm(root)
    try:
        client = start_swarm(swarm, root / MODEL)
        yield root, ref, client.socket
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def remote(env) -> RemoteModelForCausalLM:
    root, _, sock = env
    return RemoteModelForCausalLM.from_pretrained(root / MODEL, sock, codec="none")


def synthetic_task() -> list[Example]:
    """Eight random 6-token prefixes (one batch: servers take at most 8 rows), always followed by the same two
    tokens: learnable only through the adapter."""
    g = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(40, 128, (6,), generator=g).tolist() for _ in range(8)]
    return [Example([*p, 5, 9], [-100] * 6 + [5, 9]) for p in prefixes]


@pytest.mark.parametrize(("method", "lr"), [("ptune", 0.3), ("deep_ptune", 1.0), ("lora", 0.03)])
def test_training_lowers_the_loss(env, method, lr):
    model = remote(env)
    config = FinetuneConfig(method=method, steps=20, lr=lr, batch_size=8, prompt_len=8, rank=4, alpha=8.0)
    losses = train(model, synthetic_task(), config)
    print(f"{method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]


def test_lora_adapter_loads_in_peft_with_the_same_logits(env, tmp_path):
    from peft import PeftModel

    _, ref, _ = env
    model = remote(env)
    train(model, synthetic_task(), FinetuneConfig(method="lora", steps=3, lr=0.03, batch_size=8, rank=4, alpha=8.0))
    save_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x).logits
        peft = PeftModel.from_pretrained(ref, tmp_path / "adapter")
        theirs = peft(input_ids=x).logits
        again = remote(env)
        assert load_adapter(again, tmp_path / "adapter") == "lora"
        reloaded = again(x).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - reloaded).abs().max() < 1e-4
    base = remote(env)(x).logits.detach()
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the model


def test_prompts_round_trip(env, tmp_path):
    model = remote(env)
    train(model, synthetic_task(), FinetuneConfig(method="deep_ptune", steps=2, lr=0.3, batch_size=8, prompt_len=4))
    save_adapter(model, tmp_path / "prompts")
    again = remote(env)
    assert load_adapter(again, tmp_path / "prompts") == "deep_ptune"
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x).logits - again(x).logits).abs().max() < 1e-5


def test_cli_finetune_then_generate_with_the_adapter(env, tmp_path):
    root, _, sock = env
    data = tmp_path / "data.jsonl"
    prompts = ["hi there", "what is up", "hello?", "good day", "say it", "tell me"]
    data.write_text("".join(json.dumps({"prompt": p, "completion": " ok!"}) + "\n" for p in prompts))
    out = tmp_path / "lora"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "--socket",
            str(sock),
            "--json",
            "finetune",
            "-m",
            str(root / MODEL),
            "--data",
            str(data),
            "--method",
            "lora",
            "--steps",
            "40",
            "--lr",
            "0.03",
            "--batch-size",
            "6",
            "--rank",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["losses"][-1] < 0.3 * report["losses"][0]
    assert (out / "adapter_config.json").is_file()

    result = runner.invoke(
        cli,
        [
            "--socket",
            str(sock),
            "generate",
            "-m",
            str(root / MODEL),
            "--adapter",
            str(out),
            "--max-new-tokens",
            "6",
            "--json",
            "hello?",
        ],
    )
    assert result.exit_code == 0, result.output
    *pieces, line = [json.loads(text) for text in result.output.splitlines()]
    assert line["adapter"] == "lora"
    assert line["text"] == " ok!"  # learned completion, stopped at the end-of-sequence token
    assert pieces and "".join(p["text"] for p in pieces) == line["text"]  # streamed as it was generated


def test_cli_finetune_reports_bad_data(env, tmp_path):
    root, _, sock = env
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(
        cli,
        [
            "--socket",
            str(sock),
            "finetune",
            "-m",
            str(root / MODEL),
            "--data",
            str(data),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert "bad.jsonl:1" in result.output and "completion" in result.output
