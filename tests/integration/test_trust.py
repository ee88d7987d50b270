"""Trust with real petald processes: a lying server among honest ones is caught by spot checks and by `petalctl verify`.

Four daemons serve a tiny random 6-block Llama: s0 hosts [0, 3) and is the client (spot checks at rate 1.0, so every
hop of every step is re-run elsewhere); h1, h2 and "liar" host [3, 6), the liar with the test-only `--test-lie 0.5`
(noise of half the output's RMS on everything it returns). Generation must equal transformers' greedy output, the
liar must end up banned and reported, and `petalctl verify` must fail exactly the liar.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from petal.ctl.cli import cli
from petal.ctl.client import DaemonError
from tests.support.daemons import Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-trust"


@pytest.fixture(scope="module")
def model():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=6, hidden_size=32, intermediate_size=64)
    m.save_pretrained(root / MODEL, safe_serialization=True)
    yield root, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(model):
    models_root, _ = model
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(models_root), "PETAL_TEST_ONLY": "1"}
    try:
        s0 = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:3", "--spot-check-rate", "1").start(env)
        peers = {}
        for name, extra in (("h1", ()), ("h2", ()), ("liar", ("--test-lie", "0.5"))):
            d = s.make(name, "--initial-peer", s0.address, "--serve", MODEL, "--blocks", "3:6", *extra).start(env)
            peers[name] = d.status()["peer_id"]
        wait_for_route(s0, MODEL, 6)
        deadline = time.monotonic() + 60
        while len(s0.client.get(f"/v1/swarm?model={MODEL}")["models"][0]["servers"]) < 4:
            assert time.monotonic() < deadline, "the four servers never all showed up in the DHT"
            time.sleep(0.5)
        yield s0, peers
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def greedy(m, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids) :].tolist()


def test_generation_with_a_liar_equals_the_honest_output_and_bans_it(swarm, model):
    s0, peers = swarm
    ids = [5, 90, 7, 30, 12, 45]
    for _ in range(2):  # every hop of every step is checked: the liar is caught as the hop or as a reference
        lines = list(s0.client.generate(MODEL, input_ids=ids, max_new_tokens=10))
        assert lines[-1]["done"] is True
        assert lines[-1]["tokens"] == greedy(model[1], ids, 10)
    trust = s0.client.get(f"/v1/trust?model={MODEL}")
    assert set(trust["spot_checks"]["caught"]) == {peers["liar"]}
    assert trust["spot_checks"]["rate"] == 1.0 and trust["spot_checks"]["checks"] >= 10
    [m] = trust["models"]
    assert m["banned"] == [peers["liar"]]
    deadline = time.monotonic() + 30  # the signed report is published in the background
    while not m["reports"]:
        assert time.monotonic() < deadline, "no mismatch report about the liar appeared in the DHT"
        time.sleep(0.5)
        [m] = s0.client.get(f"/v1/trust?model={MODEL}")["models"]
    [report] = m["reports"]
    assert report["peer_id"] == peers["liar"] and report["signers"] == 1
    assert report["reports"][0]["signer"] == s0.status()["peer_id"] and report["reports"][0]["rel_l2"] > 0.1
    # others see it: the dashboard's data (the page and `petalctl swarm` draw it) counts one reporter for the liar only
    [dash] = s0.client.get(f"/v1/dashboard?model={MODEL}")["models"]
    assert {s["peer_id"]: s["reports"] for s in dash["servers"] if s["reports"]} == {peers["liar"]: 1}
    table = CliRunner().invoke(cli, ["--socket", str(s0.socket), "swarm", "-m", MODEL])
    assert table.exit_code == 0 and "reports" in table.output, table.output


def test_petalctl_verify_flags_exactly_the_liar(swarm):
    s0, peers = swarm
    runner = CliRunner()
    result = runner.invoke(cli, ["--socket", str(s0.socket), "--json", "verify", "-m", MODEL])
    assert result.exit_code == 1, result.output  # a server failed
    out = json.loads(result.output)
    verdicts = {s["peer_id"]: s["verdict"] for s in out["servers"]}
    assert verdicts.pop(peers["liar"]) == "fail"
    assert set(verdicts.values()) == {"pass"} and len(verdicts) == 3  # s0 (against its own blocks), h1, h2
    assert out["local_reference"] is True
    table = runner.invoke(cli, ["--socket", str(s0.socket), "verify", "-m", MODEL])
    assert table.exit_code == 1 and "fail" in table.output and peers["liar"][-8:] in table.output


def test_the_lying_option_is_refused_outside_tests(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PETAL_TEST_ONLY"}
    proc = subprocess.run(
        [sys.executable, "-m", "petal.daemon", "--state-dir", str(tmp_path), "--new-swarm", "--test-lie", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--test-lie" in proc.stderr and "only for tests" in proc.stderr


def test_trust_endpoints_match_docs_api_yaml(swarm):
    import jsonschema
    import yaml

    s0, _ = swarm
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())

    def schema(path: str, method: str) -> dict:
        ref = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        return {**ref, "components": spec["components"]}

    body = {"model": MODEL, "tokens": 4, "seed": 3}
    request = spec["paths"]["/v1/verify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**request, "components": spec["components"]})
    jsonschema.validate(s0.client.request("POST", "/v1/verify", body), schema("/v1/verify", "post"))
    jsonschema.validate(s0.client.get(f"/v1/trust?model={MODEL}"), schema("/v1/trust", "get"))
    jsonschema.validate(s0.client.get("/v1/trust"), schema("/v1/trust", "get"))
    for bad in ({"model": MODEL, "tokens": 0}, {"model": MODEL, "report": "yes"}, {"tokens": 4}):
        with pytest.raises(DaemonError) as e:
            s0.client.request("POST", "/v1/verify", bad)
        assert e.value.code == "bad_request"
    with pytest.raises(DaemonError) as e:
        s0.client.verify("nosuch")
    assert e.value.code == "not_found"
