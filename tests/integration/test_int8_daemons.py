"""8-bit weights from the CLI: two `petald --quant int8` daemons serve SmolLM2 ([0, 15) and [15, 30)); next-token
predictions over a fixed text, through them, agree with fp32 transformers on top-1 above a floor.

The kernel-level twin (tests/unit/kernels/test_smollm2.py) checks int8 spans in one process; this one proves that
the flag reaches the servers (they announce quant int8) and that quality survives the wire (codec none).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petal.daemon.routing.calls import forward
from petal.kernels.store import load_client_parts, open_model
from tests.support.daemons import Swarm, wait_for_route
from tests.support.swarms import Client
from tests.unit.kernels.test_smollm2 import TEXT

pytestmark = pytest.mark.smollm2

FLOOR = 0.90  # measured 98-99 % in one process; a broken quantizer falls far below 50 %


@pytest.fixture(scope="module")
def int8_swarm(smollm2_dir):
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    serve = ("--serve", str(smollm2_dir), "--quant", "int8", "--codec", "none", "--spot-check-rate", "0")
    try:
        boot = s.start_bootstrap("q0", *serve, "--blocks", "0:15")
        s.join("q1", boot, *serve, "--blocks", "15:30")
        wait_for_route(boot, open_model(smollm2_dir).name, 30)
        yield boot
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_int8_daemons_agree_with_fp32_on_top1(int8_swarm, smollm2_dir) -> None:
    info = open_model(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    reference = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    parts = load_client_parts(info)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    client = await Client().start(int8_swarm.status()["dht_port"])
    try:
        view = await client.router.view(info.name, fresh=True)
        assert {s.quant for s in view.servers.values()} == {"int8"}  # the flag reached both servers' records
        with torch.no_grad():
            hidden = await forward(client.router, info.name, parts.embed(ids), codec="none")
            ours = parts.logits(hidden).argmax(-1)
            want = reference(input_ids=ids).logits.argmax(-1)
    finally:
        await client.stop()
    agree = (ours == want).float().mean().item()
    print(f"\nint8 daemons: top-1 agreement with fp32 transformers over {ids.shape[1]} tokens: {agree:.3%}")
    assert agree >= FLOOR
