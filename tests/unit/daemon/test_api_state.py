"""Issue #16 finding 8: what the client daemon keeps per model name stays bounded.

Loaded frontends are keyed by the canonical model dir (so aliases share one), at most a few stay loaded, a name that
does not resolve leaves nothing behind, and the router keeps no swarm view for a model the swarm does not serve.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from petal.daemon.api.state import MAX_FRONTENDS, ApiState, NodeLike
from petal.daemon.config import Config
from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.identity import Identity
from petal.daemon.routing.swarm import ModelShape
from petal.protocol.errors import PetalError
from tests.support.tinymodels import tiny_llama


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for i in range(MAX_FRONTENDS + 2):
        tiny_llama(seed=i, num_hidden_layers=2, hidden_size=32, intermediate_size=32).save_pretrained(
            tmp_path / f"tiny{i}", safe_serialization=True
        )
    monkeypatch.setenv("PETAL_MODELS_DIR", str(tmp_path))
    return tmp_path


async def make_state() -> tuple[ApiState, MemoryDHT]:
    dht = MemoryDHT(Identity.generate(), MemorySwarm())
    await dht.start()
    node: Any = SimpleNamespace(config=Config(), dht=dht, transport=None, peer_id="me")
    return ApiState(cast(NodeLike, node)), dht


async def test_junk_names_and_aliases_keep_a_bounded_number_of_entries(models: Path):
    state, dht = await make_state()
    try:
        for i in range(30):  # distinct names that resolve to nothing: nothing is kept for them
            junk = f"junk{i}-" + "x" * 200
            for ask in (state.frontend(junk), state.router.view(junk)):
                with pytest.raises(PetalError) as e:
                    await ask
                assert e.value.code == "not_found"
        assert state.kept == {"frontends": 0, "loading": 0, "shapes": 0, "views": 0}

        first = await state.frontend("tiny0")
        aliases = [str(models / "tiny0"), str(models / "tiny1" / ".." / "tiny0")]
        aliases += [str(models / "tiny0") + "/." * k for k in range(1, 14)]
        for alias in aliases:  # 15 aliases of one dir: one copy of its client parts
            assert await state.frontend(alias) is first
        assert state.kept["frontends"] == 1

        for i in range(MAX_FRONTENDS + 2):  # more models than are kept loaded: the least recently used go
            await state.frontend(f"tiny{i}")
        assert state.kept["frontends"] == MAX_FRONTENDS and state.kept["loading"] == 0
        assert await state.frontend(f"tiny{MAX_FRONTENDS + 1}") is not first
    finally:
        await state.close()
        await dht.stop()


async def test_local_shape_is_the_local_copys_fingerprint_and_block_count(models: Path):
    state, dht = await make_state()
    try:
        frontend = await state.frontend("tiny1")
        assert await state.local_shape(str(models / "tiny1") + "/.") == ModelShape(frontend.info.fingerprint, 2)
        assert await state.local_shape("tiny2") == ModelShape(frontend_fp(models / "tiny2"), 2)  # not loaded: read
        assert await state.local_shape("nowhere") is None
    finally:
        await state.close()
        await dht.stop()


def frontend_fp(path: Path) -> str:
    from petal.kernels.store import open_model

    return open_model(path).fingerprint
