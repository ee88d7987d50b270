"""`petald pull ORG/NAME` against a local Hub (tests/support/hubserver.py) with the real `huggingface_hub` client.

The server logs every request and its byte range, so the tests assert which bytes a pull fetched: a server of blocks
[10, 20) of a 30-block tiny Llama gets config, tokenizer, the safetensors headers, those blocks' tensors and, of every
other tensor, only the first and last `SAMPLE_BYTES` (the bytes the model's fingerprint hashes, so the partial dir
has the whole model's fingerprint). The pulled dir then serves those blocks through a real daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from petal.daemon.hub import BLOCK_RE, SAMPLE_BYTES
from petal.kernels.span import Span
from petal.kernels.store import FINGERPRINT_SAMPLE_BYTES, load_client_parts, load_span, open_model
from tests.support.daemons import Swarm
from tests.support.hubserver import HubServer
from tests.support.tinymodels import TINY_VOCAB, tiny_llama

REPO = "petal-test/tiny-llama"
GATED = "petal-test/gated-llama"
TOKEN = "hf_test_secret_token"
BLOCKS = 30
HIDDEN = 128  # tensors of 32-128 KB: the 8 KB fingerprint samples of unneeded ones stay small beside them


@pytest.fixture(scope="module")
def hub():
    root = Path(tempfile.mkdtemp(prefix="petal-hub-", dir="/tmp"))
    model = tiny_llama(num_hidden_layers=BLOCKS, hidden_size=HIDDEN, intermediate_size=256, tie_word_embeddings=False)
    model.save_pretrained(root / "full", max_shard_size="2500KB")  # 8 shards of about 4 blocks each
    vocab = {f"w{i}": i for i in range(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(root / "full")
    tiny_llama(seed=3, num_hidden_layers=4).save_pretrained(root / "gated")
    server = HubServer()
    server.add_repo(REPO, root / "full")
    server.add_repo(GATED, root / "gated", token=TOKEN)
    server.start()
    server.root, server.model = root, model  # type: ignore[attr-defined]
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def pull(hub: HubServer, models_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`petald pull` as a user runs it, pointed at the local Hub."""
    full_env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(models_dir.parent / "hf"), **env}
    full_env.pop("HF_TOKEN", None) if "HF_TOKEN" not in env else None
    cmd = [sys.executable, "-m", "petal.daemon", "pull", *args, "--models-dir", str(models_dir)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def weight_layout(hub: HubServer) -> dict[str, dict[str, tuple[int, int]]]:
    """file -> tensor -> absolute [begin, end), from the full model's headers."""
    info = open_model(hub.root / "full")  # type: ignore[attr-defined]
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, e in info.tensors.items():
        out.setdefault(e.file.name, {})[name] = (e.offset, e.offset + e.nbytes)
    return out


def overlap(ranges: list[tuple[int, int]], a: int, b: int) -> int:
    """Bytes of [a, b) covered by the union of `ranges`."""
    covered = set()
    for x, y in ranges:
        covered.update(range(max(a, x), min(b, y)))
    return len(covered)


def block_of(name: str) -> int | None:
    m = BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def assert_fetched_only(hub: HubServer, start: int, end: int, client: bool) -> None:
    """Wanted tensors were fetched whole; of every other tensor at most its two fingerprint samples."""
    for file, tensors in weight_layout(hub).items():
        fetched = hub.fetched(file)
        header_end = min(a for a, _ in tensors.values())
        outside = [(a, b) for a, b in fetched if b > header_end]  # header bytes are fine
        for name, (a, b) in tensors.items():
            block = block_of(name)
            wanted = (block is None and client) or (block is not None and start <= block < end)
            got = overlap(outside, a, b)
            if wanted:
                assert got == b - a, f"{name} not fetched whole"
            else:
                assert got <= 2 * SAMPLE_BYTES, f"{name}: {got} bytes fetched but it is not needed"


def test_sample_bytes_are_the_stores_fingerprint_samples():
    assert SAMPLE_BYTES == FINGERPRINT_SAMPLE_BYTES


def test_server_pull_fetches_only_its_blocks_and_config_and_tokenizer(hub, tmp_path):
    hub.hits.clear()
    done = pull(hub, tmp_path / "models", REPO, "--blocks", "10:20")
    assert done.returncode == 0, done.stderr
    target = Path(done.stdout.strip())
    assert target == tmp_path / "models" / REPO
    assert "petald pull:" in done.stderr and "100%" in done.stderr  # progress on stderr

    for small in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert hub.fetched(small) == [(0, len(hub.repos[REPO].files[small]))]
    assert_fetched_only(hub, 10, 20, client=False)
    layout = weight_layout(hub)
    whole = [f for f, h in ((f, hub.file_hits(f)) for f in layout) if any(x.start is None for x in h)]
    only_needed = [f for f, ts in layout.items() if all(10 <= (block_of(n) or -1) < 20 for n in ts)]
    assert whole == only_needed and whole, "shards made only of needed tensors come whole, the rest as ranges"
    fetched = sum(b - a for f in layout for a, b in hub.fetched(f))
    assert fetched < 0.5 * sum(len(hub.repos[REPO].files[f]) for f in layout)

    pulled, full = open_model(target), open_model(hub.root / "full")
    assert pulled.name == REPO
    assert pulled.fingerprint == full.fingerprint  # it joins the same swarm as whole copies
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        want = Span.from_model(hub.model, 10, 20)(hidden)
        torch.testing.assert_close(load_span(pulled, 10, 20)(hidden), want, atol=1e-5, rtol=0)
    allocated = sum(p.stat().st_blocks * 512 for p in target.glob("*.safetensors"))
    assert allocated < 0.5 * sum(p.stat().st_size for p in (hub.root / "full").glob("*.safetensors"))  # sparse

    # the same pull again is served from the dir: no weight bytes are fetched twice
    hub.hits.clear()
    again = pull(hub, tmp_path / "models", REPO, "--blocks", "10:20")
    assert again.returncode == 0, again.stderr
    assert not [h for h in hub.hits if h.file and h.file.endswith(".safetensors")]

    # offline: what is cached is used, what is not is refused with the way forward
    hub.hits.clear()
    offline = pull(hub, tmp_path / "models", REPO, "--blocks", "12:18", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()) == target and not hub.hits
    refused = pull(hub, tmp_path / "models", REPO, "--blocks", "0:10", HF_HUB_OFFLINE="1")
    assert refused.returncode != 0 and "HF_HUB_OFFLINE" in refused.stderr and not hub.hits

    # the pulled dir serves: a daemon's --serve ORG/NAME hosts the pulled blocks and computes them exactly
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))
    swarm = Swarm(root)
    try:
        env = {"PETAL_MODELS_DIR": str(tmp_path / "models")}
        server = swarm.make("s", "--new-swarm", "--serve", REPO).start(extra_env=env)
        assert server.status()["serving"][0]["start"] == 10
        out = server.client.forward(REPO, hidden, start=10, end=20, codec="none")
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
        refuse = swarm.make("r", "--new-swarm", "--serve", REPO, "--blocks", "0:10")
        with pytest.raises(RuntimeError, match="partial pull"):
            refuse.start(extra_env=env)
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def test_client_only_pull_gets_embeddings_norm_and_head(hub, tmp_path):
    hub.hits.clear()
    done = pull(hub, tmp_path / "models", REPO, "--client-only")
    assert done.returncode == 0, done.stderr
    assert_fetched_only(hub, 0, 0, client=True)
    pulled, full = open_model(Path(done.stdout.strip())), open_model(hub.root / "full")
    assert pulled.fingerprint == full.fingerprint
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        got = load_client_parts(pulled).embed(ids)
        torch.testing.assert_close(got, hub.model.get_input_embeddings()(ids), atol=0, rtol=0)
    source = json.loads((Path(done.stdout.strip()) / "petal-source.json").read_text())
    assert source["client"] is True and source["blocks"] == []


def test_interrupted_pull_resumes_without_refetching(hub, tmp_path):
    hub.hits.clear()
    hub.fail_after = 12  # the 13th ranged GET of a weight file fails: the pull stops halfway
    try:
        first = pull(hub, tmp_path / "models", REPO, "--blocks", "3:27")
    finally:
        hub.fail_after = None
    assert first.returncode != 0 and "again" in first.stderr
    layout = weight_layout(hub)
    before = {f: hub.fetched(f) for f in layout}
    assert any(before.values())

    hub.hits.clear()
    second = pull(hub, tmp_path / "models", REPO, "--blocks", "3:27")
    assert second.returncode == 0, second.stderr
    for f in layout:
        done_first = [(a, b) for a, b in before[f] if a > 8]  # header bytes come from the first run's cache
        for a, b in hub.fetched(f):
            assert overlap(done_first, a, b) == 0, f"{f} [{a}, {b}) fetched again"
    pulled = open_model(Path(second.stdout.strip()))
    assert pulled.fingerprint == open_model(hub.root / "full").fingerprint
    hidden = torch.randn(1, 4, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(
            load_span(pulled, 3, 27)(hidden), Span.from_model(hub.model, 3, 27)(hidden), atol=1e-5, rtol=0
        )


def test_max_disk_refuses_before_downloading_weights(hub, tmp_path):
    hub.hits.clear()
    done = pull(hub, tmp_path / "models", REPO, "--max-disk", "1M")
    assert done.returncode != 0
    assert "--max-disk" in done.stderr and "MB" in done.stderr
    for file, tensors in weight_layout(hub).items():
        header_end = min(a for a, _ in tensors.values())
        assert all(b <= header_end for a, b in hub.fetched(file)), "weights were fetched before refusing"
    ok = pull(hub, tmp_path / "models", REPO, "--blocks", "0:2", "--max-disk", "4M")
    assert ok.returncode == 0, ok.stderr


def test_gated_repo_needs_hf_token_and_gets_it(hub, tmp_path):
    hub.hits.clear()
    denied = pull(hub, tmp_path / "models", GATED)
    assert denied.returncode != 0 and "HF_TOKEN" in denied.stderr
    hub.hits.clear()
    done = pull(hub, tmp_path / "models", GATED, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert hub.hits and all(h.auth == f"Bearer {TOKEN}" for h in hub.hits if h.repo == GATED)
