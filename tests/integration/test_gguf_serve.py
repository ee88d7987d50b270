"""GGUF files served directly: `petald pull FILE.gguf` and `petald --serve FILE.gguf` (dequantized on load).

The file is a tiny random Llama written by the `gguf` package with Q8_0 matrices (tests/support/ggufmodels.py). The
reference is transformers loading the same file (its own dequantization) and running it locally.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from petal.kernels.span import Span
from tests.support.daemons import Swarm
from tests.support.ggufmodels import write_llama_gguf
from tests.support.tinymodels import tiny_llama

HIDDEN = 64
BLOCKS = 4


@pytest.fixture(scope="module")
def gguf():
    root = Path(tempfile.mkdtemp(prefix="petal-gguf-", dir="/tmp"))
    original = tiny_llama(num_hidden_layers=BLOCKS, hidden_size=HIDDEN, tie_word_embeddings=False)
    path = write_llama_gguf(original, root / "tiny-q8.gguf")
    reference = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    yield path, original, reference
    shutil.rmtree(root, ignore_errors=True)


def test_the_gguf_file_holds_the_original_weights(gguf):
    """The writer's layout is llama.cpp's: dequantized, every weight is the original one up to Q8_0 rounding."""
    _, original, reference = gguf
    ref = reference.state_dict()
    for name, weight in original.state_dict().items():
        torch.testing.assert_close(ref[name], weight, atol=3e-3, rtol=0, msg=name)


def test_pull_converts_once_and_serve_gives_the_dequantized_outputs(gguf, tmp_path):
    path, _, reference = gguf
    models = tmp_path / "models"
    env = {**os.environ, "PETAL_MODELS_DIR": str(models)}
    done = subprocess.run(
        [sys.executable, "-m", "petal.daemon", "pull", str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    target = Path(done.stdout.strip())
    assert target == models / "tiny-q8" and (target / "model.safetensors").is_file()
    marker = (target / "petal-source.json").stat().st_mtime_ns

    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))
    swarm = Swarm(root)
    try:
        server = swarm.make("s", "--new-swarm", "--serve", str(path)).start(extra_env={"PETAL_MODELS_DIR": str(models)})
        assert (target / "petal-source.json").stat().st_mtime_ns == marker, "the same file was converted twice"
        torch.manual_seed(0)
        hidden = torch.randn(2, 6, HIDDEN)
        out = server.client.forward("tiny-q8", hidden, codec="none")
        with torch.no_grad():
            want = Span.from_model(reference, 0, BLOCKS)(hidden)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
        ids = [5, 17, 99, 3]
        lines = list(server.client.generate("tiny-q8", input_ids=ids, max_new_tokens=6))
        with torch.no_grad():
            greedy = reference.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert lines[-1]["tokens"] == greedy[0, len(ids) :].tolist()
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)

    other = tmp_path / "other" / "tiny-q8.gguf"
    other.parent.mkdir()
    write_llama_gguf(tiny_llama(seed=7, num_hidden_layers=BLOCKS, hidden_size=HIDDEN), other)
    clash = subprocess.run(
        [sys.executable, "-m", "petal.daemon", "pull", str(other)], env=env, capture_output=True, text=True, timeout=300
    )
    assert clash.returncode != 0 and "another GGUF" in clash.stderr
