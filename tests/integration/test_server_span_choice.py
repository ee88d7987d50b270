"""Three petald processes started one after another with only `--num-blocks 10` cover all 30 blocks of the model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from petal.kernels.store import open_model
from petal.protocol.records import block_key
from tests.support.blocks import tiny_llama
from tests.support.daemons import Swarm


def test_num_blocks_daemons_cover_the_model() -> None:
    root = Path(tempfile.mkdtemp(prefix="petal-nb-", dir="/tmp"))  # short: AF_UNIX paths are limited
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    name = open_model(model_dir).name
    swarm = Swarm(root)
    try:
        args = ("--serve", str(model_dir), "--num-blocks", "10", "--max-cache-tokens", "100")
        boot = swarm.start_bootstrap("n0", *args)
        daemons = [boot, swarm.join("n1", boot, *args), swarm.join("n2", boot, *args)]
        served = []
        for d in daemons:
            announced = set(d.status()["announced"])
            served.append(sorted(b for b in range(30) if block_key(name, b) in announced))
        assert served == [list(range(10)), list(range(10, 20)), list(range(20, 30))], served
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)
