"""Start-up without torch: a daemon that hosts nothing answers its socket and sends READY=1 before torch is loaded
(libtorch is not mapped into the process), and loads it on the first request that needs it, which then works.

Two real daemons: a server of a tiny random 6-block Llama (with SmolLM2's tokenizer) and a client-only daemon with
the model in its models dir (it runs the embeddings and head once asked to generate).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.client import DaemonError
from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-lazy"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def torch_mapped(daemon: Daemon) -> bool:
    """Whether libtorch's shared library is mapped into the daemon's process (what `import torch` loads)."""
    assert daemon.proc is not None
    return "libtorch" in Path(f"/proc/{daemon.proc.pid}/maps").read_text()


@pytest.fixture(scope="module")
def model(smollm2_dir):
    root = Path(tempfile.mkdtemp(prefix="petal-lz-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=6, hidden_size=32, intermediate_size=64, vocab_size=49152)
    m.save_pretrained(root / MODEL, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, root / MODEL / name)
    yield root, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def swarm(model):
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


def test_client_only_daemon_is_ready_without_torch_and_loads_it_when_asked(swarm, model):
    models_root, ref = model
    env = {"PETAL_MODELS_DIR": str(models_root)}
    server = swarm.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:6").start(extra_env=env)
    assert torch_mapped(server)  # the check sees torch where it is loaded
    client = swarm.make("c", "--initial-peer", server.address).start(extra_env=env)  # start() waits for READY=1

    status = client.status()
    assert status["peer_id"] and status["dht_peers"] >= 1
    assert client.client.get(f"/v1/dht/{MODEL}.0")["entries"]  # the DHT answers too
    assert not torch_mapped(client), "a daemon that hosts nothing loaded torch before any request needed it"

    wait_for_route(client, MODEL, 6)  # /v1/models: the first request that needs the torch-using endpoints
    ids = [5, 901, 77, 3000, 12]
    lines = list(client.client.generate(MODEL, input_ids=ids, max_new_tokens=6))
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = out[0, len(ids) :].tolist()
    eos = ref.generation_config.eos_token_id
    if isinstance(eos, int) and eos in expected:
        expected = expected[: expected.index(eos)]
    assert lines[-1]["done"] is True and lines[-1]["tokens"] == expected
    assert torch_mapped(client) and client.status()["peer_id"] == status["peer_id"]


def test_unknown_endpoint_is_still_a_json_404_and_status_keeps_answering(swarm, model):
    models_root, _ = model
    client = swarm.make("c", "--new-swarm").start(extra_env={"PETAL_MODELS_DIR": str(models_root)})
    with pytest.raises(DaemonError) as e:
        client.client.get("/v1/no-such-endpoint")
    assert e.value.code == "not_found" and "no endpoint" in str(e.value)
    assert client.status()["dht_peers"] == 0


def test_body_tensor_limit_matches_the_protocol() -> None:
    """bodies.py states the protocol's tensor limit as a number (so that it imports without torch): keep them equal."""
    from petal.daemon.api.bodies import MAX_TENSOR_BYTES
    from petal.protocol.tensors import DEFAULT_MAX_BYTES

    assert MAX_TENSOR_BYTES == DEFAULT_MAX_BYTES
