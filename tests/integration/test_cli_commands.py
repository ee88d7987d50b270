"""`petalctl chat`, `serve`, `unserve` and `bench` against real petald daemons.

Two daemons serve a tiny random 6-block Llama carrying SmolLM2's tokenizer and chat template ([0,3) and [3,6));
a third starts with no blocks and is the one `serve`/`unserve` act on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from petal.ctl.cli import cli
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def swarm(smollm2_dir):
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    models = root / "models"
    m = tiny_llama(num_hidden_layers=6, hidden_size=32, intermediate_size=64, vocab_size=49152)
    m.generation_config.eos_token_id = 2
    m.save_pretrained(models / MODEL, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, models / MODEL / name)
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1"}
    try:
        first = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:3").start(extra_env=env)
        s.make("s1", "--initial-peer", first.address, "--serve", MODEL, "--blocks", "3:6").start(extra_env=env)
        spare = s.make("s2", "--initial-peer", first.address).start(extra_env=env)
        yield first, spare
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def petalctl(daemon, *args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["--socket", str(daemon.socket), *args], input=input)


def chat_reply(daemon, messages: list[dict[str, str]], n: int) -> str:
    out = daemon.client.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": n, "temperature": 0}
    )
    return out["choices"][0]["message"]["content"]


def test_chat_keeps_the_conversation(swarm):
    first, _ = swarm
    r = petalctl(
        first,
        "chat",
        "-m",
        MODEL,
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        input="hi\n\nhow are you?\n/exit\nnever sent\n",
    )
    assert r.exit_code == 0, r.output
    a1 = chat_reply(first, [{"role": "user", "content": "hi"}], 6)
    a2 = chat_reply(
        first,
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": "how are you?"},
        ],
        6,
    )
    alone = chat_reply(first, [{"role": "user", "content": "how are you?"}], 6)
    assert a2 != alone, "the tiny model should answer differently with and without history"
    assert r.output == f"{a1}\n{a2}\n"


def test_chat_ends_at_eof_and_reset_forgets(swarm):
    first, _ = swarm
    r = petalctl(
        first, "chat", "-m", MODEL, "--temperature", "0", "--max-new-tokens", "6", input="hi\n/reset\nhow are you?\n"
    )
    assert r.exit_code == 0, r.output
    a1 = chat_reply(first, [{"role": "user", "content": "hi"}], 6)
    assert r.output == f"{a1}\n{chat_reply(first, [{'role': 'user', 'content': 'how are you?'}], 6)}\n"


def test_chat_errors_are_one_line(swarm):
    first, _ = swarm
    r = petalctl(first, "chat", "-m", "no-such-model", input="hi\n")
    assert r.exit_code == 1 and r.output.strip().startswith("error: ") and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["--socket", "/tmp/petal-no-such.sock", "chat", "-m", MODEL], input="hi\n")
    assert r.exit_code == 2 and "petald --new-swarm" in r.output


def wait_for_servers(daemon, want: int, timeout: float = 30.0) -> list[tuple[int, int, str]]:
    deadline = time.monotonic() + timeout
    while True:
        view = daemon.client.get(f"/v1/swarm?model={MODEL}")["models"]
        servers = sorted(
            (s["start"], s["end"], s["state"]) for s in (view[0]["servers"] if view else []) if s["state"] == "online"
        )
        if len(servers) == want or time.monotonic() > deadline:
            return servers
        time.sleep(0.3)


def test_serve_then_unserve(swarm):
    first, spare = swarm
    r = petalctl(spare, "serve", MODEL, "--blocks", "0:3")
    assert r.exit_code == 0, r.output
    assert f"serving {MODEL} blocks 0:3" in r.output and f"petalctl unserve {MODEL}" in r.output
    assert wait_for_servers(first, 3) == [(0, 3, "online"), (0, 3, "online"), (3, 6, "online")]

    r = petalctl(spare, "serve", MODEL, "--blocks", "2:4")
    assert r.exit_code == 1 and "overlap" in r.output and "unserve" in r.output, "the error says how to go on"
    r = petalctl(spare, "serve", MODEL, "--blocks", "3:6")  # a second, disjoint span beside the first
    assert r.exit_code == 0, r.output
    assert wait_for_servers(first, 4) == [(0, 3, "online"), (0, 3, "online"), (3, 6, "online"), (3, 6, "online")]
    r = petalctl(spare, "unserve", MODEL)
    assert r.exit_code == 1 and "--blocks 0:3" in r.output, "several spans: the error says how to name one"
    r = petalctl(spare, "unserve", MODEL, "--blocks", "3:6")
    assert r.exit_code == 0 and r.output.strip() == f"stopped serving {MODEL} blocks 3:6", r.output

    r = petalctl(spare, "unserve", MODEL)
    assert r.exit_code == 0 and r.output.strip() == f"stopped serving {MODEL} blocks 0:3", r.output
    assert wait_for_servers(first, 2) == [(0, 3, "online"), (3, 6, "online")]
    r = petalctl(spare, "unserve", MODEL)
    assert r.exit_code == 1 and r.output.startswith("error: ")

    r = petalctl(spare, "--json", "serve", MODEL, "--num-blocks", "2")
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.output.splitlines()]
    assert events[0]["event"] == "resolved" and events[-1]["event"] == "serving"
    assert [e["loaded"] for e in events if e["event"] == "loading"] == [1, 2]
    assert petalctl(spare, "unserve", MODEL).exit_code == 0

    r = petalctl(spare, "serve", MODEL, "--blocks", "0:3", "--num-blocks", "2")
    assert r.exit_code == 2 and "not both" in r.output


def test_bench_prints_route_and_figures(swarm):
    first, _ = swarm
    r = petalctl(first, "bench", "-m", MODEL, "--steps", "4", "--tokens", "8", "--batch", "2", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert [(h["start"], h["end"]) for h in figures["route"]] == [(0, 3), (3, 6)]
    assert figures["hidden_size"] == 32 and figures["steps"] == 4 and figures["batch"] == 2
    assert figures["decode_steps_per_s"] > 0 and figures["forward_tokens_per_s"] > 0
    r = petalctl(first, "bench", "-m", MODEL, "--steps", "2", "--tokens", "4", "--codec", "q8")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("route: 0:3@") and "-> 3:6@" in lines[0]
    assert lines[1].startswith("decode:") and "steps/s" in lines[1]
    assert lines[2].startswith("forward:") and "tokens/s" in lines[2]


def test_bench_errors(swarm):
    first, _ = swarm
    r = petalctl(first, "bench", "-m", "no-such-model")
    assert r.exit_code == 1 and "petalctl models list" in r.output
    r = petalctl(first, "bench", "-m", MODEL, "--steps", "0")
    assert r.exit_code == 2 and r.output.startswith("error: ")
    r = CliRunner().invoke(cli, ["--socket", "/tmp/petal-no-such.sock", "bench", "-m", MODEL])
    assert r.exit_code == 2 and "petald --new-swarm" in r.output
